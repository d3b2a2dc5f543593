"""The hardware model (:mod:`cluster.model`), the built-in clusters (:mod:`cluster.builtins`) and the
YAML/TOML spec reader and writer (:mod:`cluster.spec`). Imports nothing of sbpc."""
from cluster.model import (COLLECTIVE_KINDS, CollectivePerf, DEFAULT_HOST_ETHERNET_BANDWIDTH_BPS, DEFAULT_HOST_ETHERNET_LATENCY_S,
                           DTYPES, INTRA_NODE_CLASSES, LINK_CLASSES, NIC_TYPES, SELF_LINK, Cluster, ClusterSpecError,
                           Device, DeviceKind, Link, LinkOverride, Nic, Node, PairMatrix, RegionLink, link_class_rank)
from cluster.spec import parse_quantity

__all__ = ["Cluster", "ClusterSpecError", "CollectivePerf", "Device", "DeviceKind", "Link", "LinkOverride", "Nic", "Node", "PairMatrix",
           "RegionLink", "SELF_LINK", "LINK_CLASSES", "INTRA_NODE_CLASSES", "NIC_TYPES", "DTYPES", "COLLECTIVE_KINDS",
           "DEFAULT_HOST_ETHERNET_BANDWIDTH_BPS", "DEFAULT_HOST_ETHERNET_LATENCY_S", "link_class_rank",
           "parse_quantity"]
