"""The one protocol-error hierarchy of every codec here (P2P lines, node RPC frames).

Pure module, imported by the codecs' field modules; h11's split: a `RemoteProtocolError`
means the peer broke the protocol and the connection is unusable; a `LocalProtocolError`
means we asked to send something the protocol cannot express, a bug on our side.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every codec's errors."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (framing, an out-of-turn message): close the connection."""


class LocalProtocolError(ProtocolError):
    """We asked to send or do something the protocol cannot express: a bug on our side."""
