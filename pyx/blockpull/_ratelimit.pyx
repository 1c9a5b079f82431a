# cython: language_level=3
"""A bytes-per-second budget that a copy loop draws on before each chunk.

The limiter keeps an absolute schedule: after ``sent`` bytes since the epoch ``t0`` the
next chunk may start at ``t0 + sent / rate``. Drawing before copying means there is no
unthrottled burst at the start, and the achieved rate over a run converges on the limit.
A speed change starts a new epoch at once; ``wake()`` (abort, pause) ends any sleep at
once. The sleep is a condition-variable wait with the GIL released.

The schedule lags the clock by at most ``MAX_LAG`` seconds: time nobody drew in (a budget
made before its pulls start, every job paused, a job held back by a shared budget below its
own speed) is not saved up as credit for a burst above the rate afterwards.

A draw reserves its bytes on the schedule before sleeping (and gives them back if woken
early), so several threads drawing on one limiter share its rate: that is how a budget
shared by many pulls works. A limiter may have a ``parent``: a draw then waits on its own
schedule and then on the parent's, so a job keeps its own speed inside a shared budget.

A consumer that drew for more than it then used (a pull draws for what the top lacks
before reading a chunk, and a guest write may fill part of it before the copy) gives the
rest back with ``refund``: the schedule moves back by as much, unless it began a new epoch
meanwhile. ``charged`` counts the bytes drawn and not given back, over the limiter's life
(whatever its rate, 0 included).
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


cdef extern from *:
    """
    static inline long long bp_atomic_load(long long *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void bp_atomic_inc(long long *p) {
        __atomic_add_fetch(p, 1, __ATOMIC_ACQ_REL);
    }
    """
    long long bp_atomic_load(long long* p) noexcept nogil
    void bp_atomic_inc(long long* p) noexcept nogil


#: the most idle time (seconds) the schedule keeps as credit: enough to even out the jitter
#: of the sleeps, too little for a burst
cdef double MAX_LAG = 0.1


cdef inline double now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class RateLimiter:
    """Bytes per second, 0 = unlimited; changeable while a copy runs.

    ``parent``: another limiter (a shared budget) every draw also waits on, or None.
    Raises ValueError for a negative rate.
    """

    def __cinit__(self, int64_t rate=0, RateLimiter parent=None):
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
        self.epoch = 0
        self.charged = 0
        self.parent = parent

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
            self.epoch += 1
            bp_atomic_inc(<long long*>&self.gen)
            pthread_cond_broadcast(&self.cond)
            pthread_mutex_unlock(&self.mu)

    def wake(self):
        """End any sleep at once (abort, pause), including one on the parent's schedule."""
        with nogil:
            pthread_mutex_lock(&self.mu)
            bp_atomic_inc(<long long*>&self.gen)
            pthread_cond_broadcast(&self.cond)
            pthread_mutex_unlock(&self.mu)
        if self.parent is not None:
            self.parent._broadcast()

    def _broadcast(self):
        with nogil:
            pthread_mutex_lock(&self.mu)
            pthread_cond_broadcast(&self.cond)
            pthread_mutex_unlock(&self.mu)

    def restart(self):
        """Begin a new epoch (after a pause) so that idle time is not spent as budget."""
        with nogil:
            pthread_mutex_lock(&self.mu)
            self.t0 = now()
            self.sent = 0
            self.epoch += 1
            pthread_mutex_unlock(&self.mu)

    cdef int _draw(self, int64_t n, RateLimiter child, int64_t child_gen) noexcept nogil:
        """Reserve n bytes on this schedule and sleep until it allows them. Returns 1 if
        woken early (this limiter's or ``child``'s wake; the reservation is given back),
        0 otherwise."""
        cdef double deadline, t
        cdef timespec ts
        cdef int64_t g, ep
        cdef int woken = 0
        pthread_mutex_lock(&self.mu)
        if self._rate <= 0:
            self.charged += n
            pthread_mutex_unlock(&self.mu)
            return 0
        g = self.gen
        ep = self.epoch
        t = now() - MAX_LAG
        if self.t0 + <double>self.sent / <double>self._rate < t:
            self.t0 = t - <double>self.sent / <double>self._rate  # idle time is no credit
        self.sent += n
        deadline = self.t0 + <double>self.sent / <double>self._rate
        while True:
            t = now()
            if t >= deadline:
                break
            if self.gen != g or (child is not None and
                                 bp_atomic_load(<long long*>&child.gen) != child_gen):
                woken = 1
                break
            ts.tv_sec = <long>deadline
            ts.tv_nsec = <long>((deadline - <double>ts.tv_sec) * 1e9)
            pthread_cond_timedwait(&self.cond, &self.mu, &ts)
        if woken and self.epoch == ep:
            self.sent -= n
        if not woken:
            self.charged += n
        pthread_mutex_unlock(&self.mu)
        return woken

    cdef void _give_back(self, int64_t n, int64_t epoch) noexcept nogil:
        """Give back ``n`` bytes of a draw made in ``epoch``: no longer charged, and
        off the schedule if it is still that epoch's."""
        pthread_mutex_lock(&self.mu)
        self.charged -= n
        if self.epoch == epoch and self._rate > 0:
            self.sent -= n
        pthread_mutex_unlock(&self.mu)

    cdef bint limited(self) noexcept nogil:
        """True when a draw may sleep: this limiter or its parent has a rate."""
        return self._rate > 0 or (self.parent is not None and self.parent._rate > 0)

    cdef void epochs(self, int64_t* mine, int64_t* parents) noexcept nogil:
        """The epochs of this limiter's and its parent's schedules (-1: no parent), taken
        before a draw that may be refunded."""
        pthread_mutex_lock(&self.mu)
        mine[0] = self.epoch
        pthread_mutex_unlock(&self.mu)
        parents[0] = -1
        if self.parent is not None:
            pthread_mutex_lock(&self.parent.mu)
            parents[0] = self.parent.epoch
            pthread_mutex_unlock(&self.parent.mu)

    cdef void refund(self, int64_t n, int64_t mine, int64_t parents) noexcept nogil:
        """Give back ``n`` bytes (> 0) of a granted draw whose ``epochs`` were ``mine``
        and ``parents``: no longer charged, here or on the parent, and each schedule
        still in that epoch moves back by ``n`` (the next draws may start earlier)."""
        self._give_back(n, mine)
        if self.parent is not None:
            self.parent._give_back(n, parents)

    cdef int64_t step_bytes(self, int64_t chunk, int64_t cs):
        """Bytes to copy per step (at most ``chunk``, whole ``cs``-byte clusters): under
        a limit about 1/64 s of it, so that pacing stays smooth and the wait before the
        first step costs little of the achieved rate. The limit is the lower of this
        limiter's and its parent's (a shared budget)."""
        cdef int64_t rate = self._rate
        cdef RateLimiter parent = self.parent
        cdef int64_t c = chunk
        if parent is not None and parent._rate > 0 and (rate <= 0 or parent._rate < rate):
            rate = parent._rate
        if rate > 0:
            c = min(chunk, max(cs, rate // 64))
            c -= c % cs
            if c < cs:
                c = cs
        return c

    cdef int consume_nogil(self, int64_t n) noexcept nogil:
        """Account n bytes and sleep until the schedule (and the parent's) allows them.
        Returns 1 if woken early (nothing is accounted: the caller re-checks its flags and
        draws again), 0 otherwise."""
        cdef int64_t g = bp_atomic_load(<long long*>&self.gen)
        cdef int64_t ep
        pthread_mutex_lock(&self.mu)
        ep = self.epoch
        pthread_mutex_unlock(&self.mu)
        if self._draw(n, None, 0):
            return 1
        if self.parent is None:
            return 0
        if self.parent._draw(n, self, g):
            self._give_back(n, ep)
            return 1
        return 0

    def consume(self, int64_t n):
        """Python face of the sleep: True if it was woken early (nothing was accounted)."""
        cdef int r
        with nogil:
            r = self.consume_nogil(n)
        return bool(r)

    def give_back(self, int64_t n, int64_t mine, int64_t parents):
        """Python face of ``refund``: give back ``n`` bytes of a granted draw taken when
        ``draw_epochs()`` was (``mine``, ``parents``). Raises ValueError unless n > 0."""
        if n <= 0:
            raise ValueError("n must be > 0")
        with nogil:
            self.refund(n, mine, parents)

    def draw_epochs(self):
        """(this limiter's epoch, its parent's or -1): what ``give_back`` needs."""
        cdef int64_t mine, parents
        self.epochs(&mine, &parents)
        return mine, parents
