"""Data for compressed-cluster tests."""
import random


def text_clusters(n: int, cs: int, seed: int = 3) -> bytes:
    """``n`` clusters of ``cs`` bytes of text that compresses to about a third: every
    cluster is stored compressed by ``qemu-img convert -c``."""
    rnd = random.Random(seed)
    words = b"disk image cluster table refcount backing template overlay pull".split()
    out = bytearray()
    while len(out) < n * cs:
        out += b" ".join(rnd.choice(words) for _ in range(12)) + b" %d\n" % rnd.randrange(1 << 30)
    return bytes(out[:n * cs])
