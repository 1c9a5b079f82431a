# cython: language_level=3
"""A bytes-per-second budget that a copy loop draws on before each chunk.

The limiter keeps an absolute schedule: after ``sent`` bytes since the epoch ``t0`` the
next chunk may start at ``t0 + sent / rate``. Drawing before copying means there is no
unthrottled burst at the start, and the achieved rate over a run converges on the limit.
A speed change starts a new epoch at once; ``wake()`` (abort, pause) ends any sleep at
once. The sleep is a condition-variable wait with the GIL released.
"""
from libc.stdint cimport int64_t

cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_init(pthread_mutex_t* m, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* m)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)
    ctypedef struct pthread_condattr_t:
        pass
    int pthread_condattr_init(pthread_condattr_t* a)
    int pthread_condattr_setclock(pthread_condattr_t* a, int clock)
    int pthread_cond_init(pthread_cond_t* c, pthread_condattr_t* attr)
    int pthread_cond_destroy(pthread_cond_t* c)
    int pthread_cond_broadcast(pthread_cond_t* c)
    int pthread_cond_timedwait(pthread_cond_t* c, pthread_mutex_t* m, const timespec* t)

cdef extern from "<time.h>" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec* ts)
    int CLOCK_MONOTONIC


cdef inline double now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class RateLimiter:
    """Bytes per second, 0 = unlimited; changeable while a copy runs."""

    def __cinit__(self, int64_t rate=0):
        cdef pthread_condattr_t attr
        pthread_mutex_init(&self.mu, NULL)
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(&self.cond, &attr)
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self._rate = rate
        self.t0 = now()
        self.sent = 0
        self.gen = 0

    def __dealloc__(self):
        pthread_cond_destroy(&self.cond)
        pthread_mutex_destroy(&self.mu)

    @property
    def rate(self):
        """The current limit in bytes per second (0: unlimited)."""
        return self._rate

    def set_rate(self, int64_t rate):
        """Change the limit now; a sleeping consumer wakes and follows the new rate."""
        if rate < 0:
            raise ValueError("rate must be >= 0")
        with nogil:
            pthread_mutex_lock(&self.mu)
            self._rate = rate
            self.t0 = now()
            self.sent = 0
            self.gen += 1
            pthread_cond_broadcast(&self.cond)
            pthread_mutex_unlock(&self.mu)

    def wake(self):
        """End any sleep at once (abort, pause)."""
        with nogil:
            pthread_mutex_lock(&self.mu)
            self.gen += 1
            pthread_cond_broadcast(&self.cond)
            pthread_mutex_unlock(&self.mu)

    def restart(self):
        """Begin a new epoch (after a pause) so that idle time is not spent as budget."""
        with nogil:
            pthread_mutex_lock(&self.mu)
            self.t0 = now()
            self.sent = 0
            pthread_mutex_unlock(&self.mu)

    cdef int consume_nogil(self, int64_t n) noexcept nogil:
        """Account n bytes and sleep until the schedule allows them. Returns 1 if woken
        early (the caller re-checks its flags and draws again), 0 otherwise."""
        cdef double deadline, t
        cdef timespec ts
        cdef int64_t g
        cdef int woken = 0
        pthread_mutex_lock(&self.mu)
        if self._rate <= 0:
            pthread_mutex_unlock(&self.mu)
            return 0
        g = self.gen
        deadline = self.t0 + <double>(self.sent + n) / <double>self._rate
        while True:
            t = now()
            if t >= deadline:
                break
            if self.gen != g:
                woken = 1
                break
            ts.tv_sec = <long>deadline
            ts.tv_nsec = <long>((deadline - <double>ts.tv_sec) * 1e9)
            pthread_cond_timedwait(&self.cond, &self.mu, &ts)
        if not woken:
            self.sent += n
        pthread_mutex_unlock(&self.mu)
        return woken

    def consume(self, int64_t n):
        """Python face of the sleep: True if it was woken early (nothing was accounted)."""
        cdef int r
        with nogil:
            r = self.consume_nogil(n)
        return bool(r)
