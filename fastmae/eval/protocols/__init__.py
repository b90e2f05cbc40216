"""Evaluation protocols, one per module, found through :mod:`fastmae.eval.protocols.registry`."""

from fastmae.eval.protocols.registry import ProtocolSpec, get_protocol, list_protocols, protocol_for, register_protocol

__all__ = ["ProtocolSpec", "get_protocol", "list_protocols", "protocol_for", "register_protocol"]
