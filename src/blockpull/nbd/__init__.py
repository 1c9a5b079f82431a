"""Serving an image over NBD while it is pulled.

``protocol`` is the wire format, ``export`` what each request does to the Image,
``connection`` one client (handshake, pipelined requests), ``server`` the listener, TLS,
the Server's lifecycle and ``serve()``.
"""
from blockpull.nbd.server import Server, serve

__all__ = ["Server", "serve"]
