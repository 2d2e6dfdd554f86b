"""Local services and worker processes for the demo, the tests and the benchmarks:
throwaway Redis/PostgreSQL servers (``devservices``) and ``celery worker`` processes
(``launcher``). Never imported by a worker."""
