"""Agent side of discovery: what an agent advertises over mDNS, and the advertiser itself."""
from edge_runtime.discovery.advert import SERVICE_TYPE, AdvertError, AgentAdvert
from edge_runtime.discovery.advertiser import Advertiser
from edge_runtime.discovery.interfaces import ALL, InterfaceError, Interfaces, parse_interfaces

__all__ = ["ALL", "SERVICE_TYPE", "AdvertError", "Advertiser", "AgentAdvert", "InterfaceError",
           "Interfaces", "parse_interfaces"]
