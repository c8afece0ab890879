"""dm-bitset: a dm-array of le64 words; bit i is bit (i mod 64) of word i // 64.

Rules of this module: bits live in memory as a little-endian ``bitarray``
(whose bytes are exactly the on-disk words); only the array blocks whose bits
changed are rewritten.  The bitset does not record its length: the caller
keeps ``nr_bits`` (era keeps it in the writeset record).
"""

from bitarray import bitarray

from pydm.metadata import array

WORD = 8
WORDS_PER_BLOCK = array.max_entries_for(WORD)       # 509
BITS_PER_BLOCK = WORDS_PER_BLOCK * 64                # 32576


def info_for(tm) -> array.ArrayInfo:
    return array.ArrayInfo(tm, WORD)


def nr_words(nr_bits: int) -> int:
    return -(-nr_bits // 64)


def zeros(nr_bits: int) -> bitarray:
    b = bitarray(nr_words(nr_bits) * 64, endian="little")
    b.setall(0)
    return b


def create(info, nr_bits: int) -> int:
    """A new all-zero bitset of ``nr_bits`` bits; returns its root."""
    root = array.empty(info)
    return array.resize(info, root, 0, nr_words(nr_bits), bytes(WORD))


def write_blocks(info, root: int, bits: bitarray, block_indexes) -> int:
    """Write array blocks ``block_indexes`` from ``bits`` (padded to words)."""
    for j in sorted(block_indexes):
        chunk = bits[j * BITS_PER_BLOCK:(j + 1) * BITS_PER_BLOCK]
        root = array.set_block(info, root, j, chunk.tobytes())
    return root


def read(reader, root: int, nr_bits: int) -> bitarray:
    """The bits of a bitset (length rounded up to whole words)."""
    b = bitarray(endian="little")
    b.frombytes(array.read_all(reader, root, nr_words(nr_bits), WORD))
    return b


def resize(info, root: int, old_bits: int, new_bits: int) -> int:
    return array.resize(info, root, nr_words(old_bits), nr_words(new_bits), bytes(WORD))


def delete(info, root: int) -> None:
    array.delete(info, root)
