/* distload's native CUDA read pipeline: reader threads that hold no interpreter lock.
 *
 * Each reader pins a few slots of its own, takes the next chunk (in file order), fills one of its
 * slots from the file with pread, and queues the slot's copy to the device on its own stream, followed by the
 * slot's event. Before a slot is filled again its event is waited on, and only then is the chunk
 * it held marked done: a chunk counts once its copy has completed, never before.
 *
 * The CUDA runtime is not linked: the Python side passes the addresses of the runtime functions
 * of the library torch loaded, so this file needs no CUDA headers and builds with any C compiler.
 * Any failure (a read error, a file shorter than its header said, a CUDA call) stops every
 * reader; the copies already queued still complete before each reader frees its slots and ends.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DL_ABI 1

typedef struct {
    int (*set_device)(int);
    int (*memcpy_async)(void *, const void *, size_t, int, void *);
    int (*stream_create)(void **, unsigned);
    int (*stream_destroy)(void *);
    int (*event_create)(void **, unsigned);
    int (*event_record)(void *, void *);
    int (*event_synchronize)(void *);
    int (*event_destroy)(void *);
    int (*host_alloc)(void **, size_t, unsigned);
    int (*free_host)(void *);
} dl_cuda;

enum { DL_OK = 0, DL_READ_ERROR = 1, DL_SHORT_FILE = 2, DL_CUDA_ERROR = 3, DL_START_ERROR = 4 };

/* Chunk i is bytes seg_offset..seg_offset+seg_nbytes of descriptor seg_fd for each segment k in
 * [seg_begin[i], seg_begin[i+1]), laid end to end in a slot and copied to dst[i] (nbytes[i]). */
typedef struct {
    int64_t count;
    const int64_t *seg_begin;
    const int32_t *seg_fd;
    const int64_t *seg_offset;
    const int64_t *seg_nbytes;
    const uint64_t *dst;
    const int64_t *nbytes;
    uint8_t *done;          /* out: 1 once chunk i's copy completed */
    int64_t *bytes_done;    /* out: bytes of completed chunks, per reader */
    int64_t slot_bytes;
    int32_t readers;
    int32_t slots_per_reader;
    int32_t device;
    int32_t stop;           /* set by either side: no reader takes another chunk */
    int64_t next;           /* the next chunk no reader has taken (read by the caller for pacing) */
    int64_t pinned;         /* host bytes the readers hold pinned now */
    int64_t pinned_peak;    /* out: the most they held at once */
    int32_t status;         /* out: DL_OK, or the first failure's kind */
    int32_t code;           /* out: its errno or CUDA error */
    int64_t failed_chunk;   /* out: the chunk it happened in, or -1 */
    int64_t failed_offset;  /* out: the file offset it happened at, or -1 */
    const char *failed_call;/* out: the CUDA call that failed, or NULL */
    dl_cuda cuda;
    void *state;            /* internal */
} dl_job;

typedef struct {
    dl_job *job;
    int32_t index;
} dl_reader;

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t ended;
    int32_t running;
    int32_t started;
    pthread_t *threads;
    dl_reader *readers;
} dl_state;

static void fail(dl_job *job, int32_t status, int32_t code, int64_t chunk, int64_t offset, const char *call) {
    dl_state *st = job->state;
    pthread_mutex_lock(&st->lock);
    if (job->status == DL_OK) {
        job->status = status;
        job->code = code;
        job->failed_chunk = chunk;
        job->failed_offset = offset;
        job->failed_call = call;
    }
    pthread_mutex_unlock(&st->lock);
    __atomic_store_n(&job->stop, 1, __ATOMIC_RELEASE);
}

static int cuda_ok(dl_job *job, int rc, const char *call, int64_t chunk) {
    if (rc != 0) fail(job, DL_CUDA_ERROR, rc, chunk, -1, call);
    return rc == 0;
}

static int fill_slot(dl_job *job, int64_t i, uint8_t *slot) {
    int64_t at = 0;
    for (int64_t k = job->seg_begin[i]; k < job->seg_begin[i + 1]; k++) {
        int64_t want = job->seg_nbytes[k], got = 0, offset = job->seg_offset[k];
        while (got < want) {
            ssize_t n = pread(job->seg_fd[k], slot + at + got, (size_t)(want - got), (off_t)(offset + got));
            if (n < 0) {
                if (errno == EINTR) continue;
                fail(job, DL_READ_ERROR, errno, i, offset + got, NULL);
                return 0;
            }
            if (n == 0) {
                fail(job, DL_SHORT_FILE, 0, i, offset + got, NULL);
                return 0;
            }
            got += n;
        }
        at += want;
    }
    return 1;
}

static void *reader(void *arg) {
    dl_reader *me = arg;
    dl_job *job = me->job;
    int32_t r = me->index;
    int32_t spr = job->slots_per_reader;
    void *stream = NULL;
    void *events[64];
    int64_t held[64];  /* the chunk whose copy a slot's event follows, or -1 */
    int32_t made = 0, s = 0;
    void *mine = NULL;
    int64_t mine_bytes = (int64_t)spr * job->slot_bytes;
    if (!cuda_ok(job, job->cuda.set_device(job->device), "cudaSetDevice", -1)) goto end;
    /* each reader pins its own slots: in parallel, and its first read starts as soon as they exist
     * (one pool pinned up front took 12 ms of a 0.24 s load on an H200 host) */
    if (!cuda_ok(job, job->cuda.host_alloc(&mine, (size_t)mine_bytes, 0), "cudaHostAlloc", -1)) goto end;
    int64_t now = __atomic_add_fetch(&job->pinned, mine_bytes, __ATOMIC_RELAXED);
    int64_t peak = __atomic_load_n(&job->pinned_peak, __ATOMIC_RELAXED);
    while (now > peak && !__atomic_compare_exchange_n(&job->pinned_peak, &peak, now, 1, __ATOMIC_RELAXED,
                                                      __ATOMIC_RELAXED)) {
    }
    /* cudaStreamNonBlocking: the caller synchronized its stream before starting the job */
    if (!cuda_ok(job, job->cuda.stream_create(&stream, 0x1), "cudaStreamCreateWithFlags", -1)) goto end;
    for (; made < spr; made++) {
        held[made] = -1;
        /* cudaEventBlockingSync | cudaEventDisableTiming: a waiting reader sleeps */
        if (!cuda_ok(job, job->cuda.event_create(&events[made], 0x1 | 0x2), "cudaEventCreateWithFlags", -1))
            goto drain;
    }
    while (!__atomic_load_n(&job->stop, __ATOMIC_ACQUIRE)) {
        int64_t i = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (i >= job->count) break;
        if (held[s] >= 0) {
            if (!cuda_ok(job, job->cuda.event_synchronize(events[s]), "cudaEventSynchronize", held[s])) goto drain;
            job->done[held[s]] = 1;
            __atomic_fetch_add(&job->bytes_done[r], job->nbytes[held[s]], __ATOMIC_RELAXED);
            held[s] = -1;
        }
        uint8_t *slot = (uint8_t *)mine + (int64_t)s * job->slot_bytes;
        if (!fill_slot(job, i, slot)) goto drain;
        if (!cuda_ok(job, job->cuda.memcpy_async((void *)(uintptr_t)job->dst[i], slot, (size_t)job->nbytes[i], 1,
                                                 stream), "cudaMemcpyAsync", i)) goto drain;
        if (!cuda_ok(job, job->cuda.event_record(events[s], stream), "cudaEventRecord", i)) goto drain;
        held[s] = i;
        s = (s + 1) % spr;
    }
drain:  /* the copies queued from this reader's slots finish before the slots can be freed */
    for (int32_t k = 0; k < made; k++) {
        if (held[k] >= 0 && job->cuda.event_synchronize(events[k]) == 0 && job->status == DL_OK) {
            job->done[held[k]] = 1;
            __atomic_fetch_add(&job->bytes_done[r], job->nbytes[held[k]], __ATOMIC_RELAXED);
        }
        job->cuda.event_destroy(events[k]);
    }
    if (stream != NULL) job->cuda.stream_destroy(stream);
end:
    if (mine != NULL) {  /* its copies have completed: drained above */
        job->cuda.free_host(mine);
        __atomic_sub_fetch(&job->pinned, mine_bytes, __ATOMIC_RELAXED);
    }
    dl_state *st = job->state;
    pthread_mutex_lock(&st->lock);
    st->running--;
    pthread_cond_broadcast(&st->ended);
    pthread_mutex_unlock(&st->lock);
    return NULL;
}

int dl_abi(void) { return DL_ABI; }

int64_t dl_job_size(void) { return (int64_t)sizeof(dl_job); }

/* Starts the job's readers; 0, or an errno when not one could start (then nothing runs). */
int dl_start(dl_job *job) {
    if (job->slots_per_reader < 1 || job->slots_per_reader > 64 || job->readers < 1) return EINVAL;
    dl_state *st = calloc(1, sizeof(dl_state));
    if (st == NULL) return ENOMEM;
    st->threads = calloc((size_t)job->readers, sizeof(pthread_t));
    st->readers = calloc((size_t)job->readers, sizeof(dl_reader));
    if (st->threads == NULL || st->readers == NULL) {
        free(st->threads);
        free(st->readers);
        free(st);
        return ENOMEM;
    }
    pthread_mutex_init(&st->lock, NULL);
    pthread_cond_init(&st->ended, NULL);
    job->state = st;
    job->status = DL_OK;
    job->failed_chunk = -1;
    job->failed_offset = -1;
    for (int32_t r = 0; r < job->readers; r++) {
        dl_reader *me = &st->readers[r];
        me->job = job;
        me->index = r;
        pthread_mutex_lock(&st->lock);
        st->running++;
        pthread_mutex_unlock(&st->lock);
        int rc = pthread_create(&st->threads[r], NULL, reader, me);
        if (rc != 0) {
            pthread_mutex_lock(&st->lock);
            st->running--;
            pthread_mutex_unlock(&st->lock);
            if (r == 0) {
                fail(job, DL_START_ERROR, rc, -1, -1, NULL);
                return rc;
            }
            break;  /* fewer readers: the ones started take every chunk */
        }
        st->started++;
    }
    return 0;
}

/* 1 once every reader has ended (their threads joined), else 0 after waiting up to timeout_ms. */
int dl_wait(dl_job *job, int32_t timeout_ms) {
    dl_state *st = job->state;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&st->lock);
    while (st->running > 0) {
        if (pthread_cond_timedwait(&st->ended, &st->lock, &until) == ETIMEDOUT) break;
    }
    int finished = st->running == 0;
    pthread_mutex_unlock(&st->lock);
    if (finished && st->threads != NULL) {
        for (int32_t r = 0; r < st->started; r++) pthread_join(st->threads[r], NULL);
        free(st->threads);
        st->threads = NULL;
    }
    return finished;
}

/* Frees what dl_start allocated; only after dl_wait returned 1. */
void dl_free(dl_job *job) {
    dl_state *st = job->state;
    if (st == NULL) return;
    pthread_mutex_destroy(&st->lock);
    pthread_cond_destroy(&st->ended);
    free(st->threads);
    free(st->readers);
    free(st);
    job->state = NULL;
}
