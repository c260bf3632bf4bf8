"""Multi-node clusters on etcd (docs/CLUSTER.md): membership, placement, the sandbox→node map,
and forwarding API calls and sandbox traffic to the node a sandbox lives on.

Off unless the config names etcd endpoints (`etcd_endpoints`); a single node keeps SQLite alone.
"""
