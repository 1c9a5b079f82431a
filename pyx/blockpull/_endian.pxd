# Loads and stores of 64-bit on-disk integers at any alignment: qcow2 is big-endian,
# QED little-endian. Inline, so every module that cimports them compiles its own copy.
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

cdef extern from "<endian.h>" nogil:
    uint64_t be64toh(uint64_t x)
    uint64_t htobe64(uint64_t x)
    uint64_t le64toh(uint64_t x)
    uint64_t htole64(uint64_t x)


cdef inline uint64_t ld_be64(const unsigned char* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return be64toh(v)


cdef inline void st_be64(unsigned char* p, uint64_t v) noexcept nogil:
    v = htobe64(v)
    memcpy(p, &v, 8)


cdef inline uint64_t ld_le64(const unsigned char* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return le64toh(v)


cdef inline void st_le64(unsigned char* p, uint64_t v) noexcept nogil:
    v = htole64(v)
    memcpy(p, &v, 8)
