"""The feature store: HDF5 shards in a folder or an object store, their checksum manifest, and
the cache verbs (``featurefleet cache ls / verify / rm``).

``files`` (where files live, one fsspec code path), ``shards`` (write, the one validity check,
read, stream), ``manifest`` (writer-computed checksums), ``cache`` (the verbs).
"""
