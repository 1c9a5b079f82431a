"""Serving an image over NBD while it is pulled.

``protocol`` is the wire format, ``export`` what each request does to the Image,
``server`` the transport (socket, handshake, pipelined requests) and ``serve()``.
"""
from blockpull.nbd.server import Server, serve

__all__ = ["Server", "serve"]
