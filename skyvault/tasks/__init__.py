"""The ``@task`` adapters: each wraps one domain function, adding retries and concurrency tags.

Concurrency tags bound the tasks that move data: bytes to or from LTS (``lts-read``,
``lts-write``) and the object store (``object-store-read``, ``object-store-write``), catalog
writes (``catalog-write``) and calls to the data catalog (``data-catalog``). Listings, reads of
small documents (statuses, manifests, items) and their writes carry no tag: each tagged task
costs three calls to the Prefect server (acquire, renew, release) and may wait for a slot, which
for a metadata call would cost more than the call itself.
"""
