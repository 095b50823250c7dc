"""Binary caches: a tree of static files any web server can serve, and the verb that
copies closures between a local store and a cache.

Layout (format 3; a format 2 cache gets no format 3 records)::

    castore-cache.json        {"format": 3, "chunking": {...}, "compression": "zstd"}
    objects/<id>              canonical msgpack: format, kind, size, refs, chunks [[bin chunk id, length], ...]
                              (format 3, over 64 chunks: lists [[bin list chunk id, count, bytes], ...])
    chunks/<ab>/<chunk id>    one zstd frame holding that chunk's bytes (or a list chunk's)

A cache is reached through a :class:`~castore.cache.transport.Transport`: a few
primitives (get, put, exists, missing) over a directory or over HTTP, where
``castore serve`` (:mod:`castore.cache.server`) adds verified uploads.
Nothing is published before what it names: chunks before their object,
an object after every object it references, so a reader never sees a
record it cannot complete.
"""
