"""Cluster mode: tandem sharded and replicated on Ray Serve (``pip install tandem[cluster]``).

- ``sharding``: a point's shard, from a stable hash of its id (256 virtual shards on S physical ones).
- ``sharded``: ``ShardedCollection``, the library's collection interface over S x R shard copies
  (fan-out and merge for reads, every copy for writes), and ``ClusterRegistry``, the service's
  registry over them. The HTTP app is the single node's, given this registry.
- ``serve``: the Ray Serve application: one deployment per (shard, copy) holding today's
  collection engine on its node's disk, and the router (the FastAPI ingress).

Nothing here is imported by a single node: Ray is needed only in cluster mode.
"""
