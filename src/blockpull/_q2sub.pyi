"""Type stubs for the compiled module blockpull._q2sub."""
from blockpull._q2order import Qcow2Ordering


class Qcow2Sub(Qcow2Ordering): ...
