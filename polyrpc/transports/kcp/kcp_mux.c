/* Many KCP engines on one UDP socket, with batched system calls.
 *
 * Sessions are keyed by (peer address, conv). One kmux_poll drains the socket
 * with recvmmsg and feeds every datagram to its engine; one kmux_flush sends
 * everything the touched engines produced with sendmmsg. Python sees only
 * events (data ready, control datagram, dead session, writable again).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "kcpcore.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <unistd.h>

#define DIFF(a, b) ((int32_t)((uint32_t)(a) - (uint32_t)(b)))
#define BATCH 64
#define POLL_BUDGET 1024
#define RECV_SLOT 2048
#define ERRQUEUE_BUDGET 64

typedef struct msess {
    kcp_engine *k;
    struct msess *hnext;
    struct kcp_mux *mux;
    int sid;
    uint32_t conv;
    uint32_t hash;
    uint8_t addr[28];
    uint32_t addrlen;
    uint8_t dirty, data_flag, dead, established;
    uint32_t deadline;
    int has_deadline;
    uint32_t last_recv, last_send, idle_ms, keepalive_ms;
    int64_t notify_below;
} msess;

struct kcp_mux {
    int fd;
    int batch; /* datagrams per recvmmsg/sendmmsg (<= BATCH) */
    int connected; /* the socket is connected to its only peer: send without an address */
    msess **slots;
    int nslots, cap_slots;
    int *free_sids;
    int nfree;
    msess **buckets;
    uint32_t nbuckets;
    uint32_t nsessions;
    int *dirty;
    int ndirty, cap_dirty;
    /* send batch */
    struct mmsghdr smsg[BATCH];
    struct iovec siov[BATCH];
    uint8_t saddr[BATCH][28];
    uint8_t *sbuf;
    uint32_t sslot;
    int nsend;
    /* receive batch */
    struct mmsghdr rmsg[BATCH];
    struct iovec riov[BATCH];
    struct sockaddr_storage raddr[BATCH];
    uint8_t *rbuf;
    uint32_t rslot;
    int pending_errno;
    int recverr;          /* ICMP errors are read from the socket's error queue */
    int errq_pending;     /* a send failed with an ICMP error: drain the error queue */
    uint32_t cookie_ms;   /* SYN cookie time bucket, 0: cookies off */
    uint32_t cookie_bucket;
    uint8_t secret[2][16]; /* [0] this bucket's, [1] the previous bucket's */
    uint32_t now;
    int tfd;           /* timerfd: readable when the next session deadline is due */
    int efd;           /* epoll fd watching the socket: what the event loop watches */
    uint32_t armed_at; /* when it fires, if timer_armed */
    int timer_armed;
    kmux_stats st;
};

static inline uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static inline void wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline uint64_t rd64(const uint8_t *p)
{
    return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32);
}

/* ---- SipHash-2-4 (Aumasson & Bernstein), the SYN cookie's MAC ---------------- */

#define ROTL64(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND(v0, v1, v2, v3)                                                              \
    do {                                                                                      \
        v0 += v1;                                                                             \
        v1 = ROTL64(v1, 13);                                                                  \
        v1 ^= v0;                                                                             \
        v0 = ROTL64(v0, 32);                                                                  \
        v2 += v3;                                                                             \
        v3 = ROTL64(v3, 16);                                                                  \
        v3 ^= v2;                                                                             \
        v0 += v3;                                                                             \
        v3 = ROTL64(v3, 21);                                                                  \
        v3 ^= v0;                                                                             \
        v2 += v1;                                                                             \
        v1 = ROTL64(v1, 17);                                                                  \
        v1 ^= v2;                                                                             \
        v2 = ROTL64(v2, 32);                                                                  \
    } while (0)

uint64_t kcp_siphash24(const uint8_t *key, const uint8_t *data, size_t len)
{
    uint64_t k0 = rd64(key), k1 = rd64(key + 8);
    uint64_t v0 = 0x736f6d6570736575ULL ^ k0, v1 = 0x646f72616e646f6dULL ^ k1;
    uint64_t v2 = 0x6c7967656e657261ULL ^ k0, v3 = 0x7465646279746573ULL ^ k1;
    size_t whole = len - len % 8;
    for (size_t i = 0; i < whole; i += 8) {
        uint64_t m = rd64(data + i);
        v3 ^= m;
        SIPROUND(v0, v1, v2, v3);
        SIPROUND(v0, v1, v2, v3);
        v0 ^= m;
    }
    uint64_t last = (uint64_t)(len & 0xff) << 56;
    for (size_t i = 0; i < len % 8; i++)
        last |= (uint64_t)data[whole + i] << (8 * i);
    v3 ^= last;
    SIPROUND(v0, v1, v2, v3);
    SIPROUND(v0, v1, v2, v3);
    v0 ^= last;
    v2 ^= 0xff;
    for (int i = 0; i < 4; i++)
        SIPROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

/* ---- addresses --------------------------------------------------------- */

int kaddr_pack(const char *host, int port, uint8_t *out)
{
    memset(out, 0, 28);
    struct sockaddr_in a4;
    struct sockaddr_in6 a6;
    memset(&a4, 0, sizeof a4);
    memset(&a6, 0, sizeof a6);
    if (inet_pton(AF_INET, host, &a4.sin_addr) == 1) {
        a4.sin_family = AF_INET;
        a4.sin_port = htons((uint16_t)port);
        memcpy(out, &a4, sizeof a4);
        return (int)sizeof a4;
    }
    if (inet_pton(AF_INET6, host, &a6.sin6_addr) == 1) {
        a6.sin6_family = AF_INET6;
        a6.sin6_port = htons((uint16_t)port);
        memcpy(out, &a6, sizeof a6);
        return (int)sizeof a6;
    }
    return -1;
}

int kaddr_unpack(const uint8_t *addr, uint32_t addrlen, char *host, int cap, int *port)
{
    sa_family_t family;
    if (addrlen < sizeof(sa_family_t))
        return -1;
    memcpy(&family, addr, sizeof family);
    if (family == AF_INET && addrlen >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in a4;
        memcpy(&a4, addr, sizeof a4);
        *port = ntohs(a4.sin_port);
        return inet_ntop(AF_INET, &a4.sin_addr, host, (socklen_t)cap) ? 0 : -1;
    }
    if (family == AF_INET6 && addrlen >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a6;
        memcpy(&a6, addr, sizeof a6);
        *port = ntohs(a6.sin6_port);
        return inet_ntop(AF_INET6, &a6.sin6_addr, host, (socklen_t)cap) ? 0 : -1;
    }
    return -1;
}

/* the bytes that identify a peer: family, port and address (not padding) */
static uint32_t addr_key(const uint8_t *addr, uint32_t addrlen, uint8_t *key)
{
    sa_family_t family;
    memset(key, 0, 20);
    if (addrlen < sizeof(sa_family_t))
        return 0;
    memcpy(&family, addr, sizeof family);
    if (family == AF_INET && addrlen >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in a4;
        memcpy(&a4, addr, sizeof a4);
        key[0] = 4;
        memcpy(key + 2, &a4.sin_port, 2);
        memcpy(key + 4, &a4.sin_addr, 4);
        return 8;
    }
    if (family == AF_INET6 && addrlen >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a6;
        memcpy(&a6, addr, sizeof a6);
        key[0] = 6;
        memcpy(key + 2, &a6.sin6_port, 2);
        memcpy(key + 4, &a6.sin6_addr, 16);
        return 20;
    }
    return 0;
}

static uint32_t hash_key(const uint8_t *key, uint32_t n, uint32_t conv)
{
    uint32_t h = 2166136261u ^ conv;
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ key[i]) * 16777619u;
    h ^= conv * 2654435761u;
    return h ^ (h >> 15);
}

static int same_peer(const msess *s, const uint8_t *key, uint32_t n)
{
    uint8_t k2[20];
    uint32_t n2 = addr_key(s->addr, s->addrlen, k2);
    return n2 == n && memcmp(k2, key, n) == 0;
}

static msess *lookup(kcp_mux *m, const uint8_t *addr, uint32_t addrlen, uint32_t conv)
{
    uint8_t key[20];
    uint32_t n = addr_key(addr, addrlen, key);
    if (!n)
        return NULL;
    uint32_t h = hash_key(key, n, conv);
    for (msess *s = m->buckets[h & (m->nbuckets - 1)]; s; s = s->hnext)
        if (s->hash == h && s->conv == conv && same_peer(s, key, n))
            return s;
    return NULL;
}

static int grow_buckets(kcp_mux *m)
{
    uint32_t nb = m->nbuckets * 2;
    msess **b = (msess **)calloc(nb, sizeof(msess *));
    if (!b)
        return -1;
    for (uint32_t i = 0; i < m->nbuckets; i++) {
        msess *s = m->buckets[i];
        while (s) {
            msess *n = s->hnext;
            s->hnext = b[s->hash & (nb - 1)];
            b[s->hash & (nb - 1)] = s;
            s = n;
        }
    }
    free(m->buckets);
    m->buckets = b;
    m->nbuckets = nb;
    return 0;
}

/* ---- SYN cookies ------------------------------------------------------------ */

/* Fill out with n bytes from the kernel's CSPRNG; -1 if it cannot be read. */
static int fill_random(uint8_t *out, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = getrandom(out + got, n - got, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        got += (size_t)r;
    }
    return 0;
}

/* Move to the time bucket of now: the current secret becomes the previous one and a fresh
   one is drawn (both are fresh after a gap of more than one bucket). */
static void cookie_rotate(kcp_mux *m, uint32_t now)
{
    uint32_t bucket = now / m->cookie_ms;
    if (bucket == m->cookie_bucket)
        return;
    if (bucket == m->cookie_bucket + 1)
        memcpy(m->secret[1], m->secret[0], sizeof m->secret[0]);
    else if (fill_random(m->secret[1], sizeof m->secret[1]) < 0)
        return; /* keep the old secrets (still secret) rather than weak ones */
    if (fill_random(m->secret[0], sizeof m->secret[0]) < 0)
        return;
    m->cookie_bucket = bucket;
}

/* MAC(secret, address family | port | address | conv | bucket), 64 bits */
static uint64_t cookie_mac(const uint8_t *secret, const uint8_t *key, uint32_t n, uint32_t conv,
                           uint32_t bucket)
{
    uint8_t msg[28];
    memcpy(msg, key, n);
    wr32(msg + n, conv);
    wr32(msg + n + 4, bucket);
    return kcp_siphash24(secret, msg, n + 8);
}

int kmux_set_cookies(kcp_mux *m, uint32_t bucket_ms)
{
    if (bucket_ms == 0) {
        m->cookie_ms = 0;
        return 0;
    }
    if (fill_random(m->secret[0], sizeof m->secret[0]) < 0 ||
        fill_random(m->secret[1], sizeof m->secret[1]) < 0)
        return -1;
    m->cookie_ms = bucket_ms;
    m->cookie_bucket = kcp_now_ms() / bucket_ms;
    return 0;
}

/* Answer a SYN without a valid cookie (no state is kept: the answer is computed again) or
   let it through (1). Cookies of this bucket and the previous one are valid. */
static int cookie_check(kcp_mux *m, const uint8_t *addr, uint32_t addrlen, uint32_t conv,
                        uint32_t ts, uint32_t sn)
{
    uint8_t key[20];
    uint32_t n = addr_key(addr, addrlen, key);
    if (!n)
        return 0;
    cookie_rotate(m, m->now);
    uint64_t echoed = ((uint64_t)ts << 32) | sn;
    if (echoed == cookie_mac(m->secret[0], key, n, conv, m->cookie_bucket) ||
        echoed == cookie_mac(m->secret[1], key, n, conv, m->cookie_bucket - 1)) {
        m->st.cookies_accepted++;
        return 1;
    }
    uint64_t cookie = cookie_mac(m->secret[0], key, n, conv, m->cookie_bucket);
    kmux_ctrl(m, addr, addrlen, conv, KCP_CTL_COOKIE, 0, (uint32_t)(cookie >> 32),
              (uint32_t)cookie, KCP_MAGIC);
    m->st.cookies_sent++;
    return 0;
}

/* ---- ICMP errors ---------------------------------------------------------------- */

int kmux_set_recverr(kcp_mux *m, int on)
{
    int v = on ? 1 : 0;
    int ok4 = setsockopt(m->fd, SOL_IP, IP_RECVERR, &v, sizeof v) == 0;
    int ok6 = setsockopt(m->fd, SOL_IPV6, IPV6_RECVERR, &v, sizeof v) == 0;
    m->recverr = on && (ok4 || ok6);
    return ok4 || ok6 ? 0 : -errno;
}

static int add_event(kmux_event *ev, int *n, int maxev, int32_t sid, int32_t type, int32_t err);

/* Read the socket's error queue: an ICMP port unreachable names the destination and
   quotes our datagram (its conv), so it ends exactly that session: its peer's process is
   gone. Other ICMP errors (host unreachable...) may pass and are only counted. */
static void drain_errqueue(kcp_mux *m, kmux_event *ev, int *n, int maxev)
{
    m->errq_pending = 0;
    for (int i = 0; i < ERRQUEUE_BUDGET; i++) {
        uint8_t data[KCP_HEADER];
        struct sockaddr_storage name;
        union {
            uint8_t buf[256];
            struct cmsghdr align;
        } ctl;
        struct iovec iov = {data, sizeof data};
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_name = &name;
        msg.msg_namelen = sizeof name;
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl.buf;
        msg.msg_controllen = sizeof ctl.buf;
        ssize_t r = recvmsg(m->fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT);
        m->st.syscalls_in++;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        m->st.icmp_errors++;
        struct sock_extended_err ee;
        int found = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if ((c->cmsg_level == SOL_IP && c->cmsg_type == IP_RECVERR) ||
                (c->cmsg_level == SOL_IPV6 && c->cmsg_type == IPV6_RECVERR)) {
                memcpy(&ee, CMSG_DATA(c), sizeof ee);
                found = 1;
            }
        }
        if (!found || r < 4 || ee.ee_errno != ECONNREFUSED ||
            (ee.ee_origin != SO_EE_ORIGIN_ICMP && ee.ee_origin != SO_EE_ORIGIN_ICMP6))
            continue;
        msess *s = lookup(m, (const uint8_t *)&name, msg.msg_namelen, rd32(data));
        if (s && !s->dead && add_event(ev, n, maxev, s->sid, KMUX_EV_DEAD, 3) == 0) {
            s->dead = 1;
            s->has_deadline = 0;
            m->st.peers_unreachable++;
        }
    }
    m->errq_pending = 1; /* more than the budget: the rest on the next poll */
}

/* ---- construction -------------------------------------------------------- */

static int size_slots(kcp_mux *m, uint32_t slot)
{
    uint8_t *s = (uint8_t *)malloc((size_t)m->batch * slot);
    uint8_t *r = (uint8_t *)malloc((size_t)m->batch * slot);
    if (!s || !r) {
        free(s);
        free(r);
        return -1;
    }
    free(m->sbuf);
    free(m->rbuf);
    m->sbuf = s;
    m->rbuf = r;
    m->sslot = m->rslot = slot;
    m->nsend = 0;
    for (int i = 0; i < m->batch; i++) {
        m->riov[i].iov_base = m->rbuf + (size_t)i * m->rslot;
        m->riov[i].iov_len = m->rslot;
        memset(&m->rmsg[i], 0, sizeof m->rmsg[i]);
        m->rmsg[i].msg_hdr.msg_name = &m->raddr[i];
        m->rmsg[i].msg_hdr.msg_namelen = sizeof m->raddr[i];
        m->rmsg[i].msg_hdr.msg_iov = &m->riov[i];
        m->rmsg[i].msg_hdr.msg_iovlen = 1;
    }
    return 0;
}

void kmux_set_connected(kcp_mux *m, int connected) { m->connected = connected; }

kcp_mux *kmux_new(int fd, int batch)
{
    kcp_mux *m = (kcp_mux *)calloc(1, sizeof(kcp_mux));
    if (!m)
        return NULL;
    m->fd = fd;
    m->batch = batch < 1 ? 1 : batch > BATCH ? BATCH : batch;
    m->nbuckets = 16;
    m->buckets = (msess **)calloc(m->nbuckets, sizeof(msess *));
    m->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    m->efd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event watch;
    memset(&watch, 0, sizeof watch);
    watch.events = EPOLLIN;
    watch.data.fd = fd;
    if (!m->buckets || m->tfd < 0 || m->efd < 0 || size_slots(m, RECV_SLOT) < 0 ||
        epoll_ctl(m->efd, EPOLL_CTL_ADD, fd, &watch) < 0) {
        kmux_free(m);
        return NULL;
    }
    return m;
}

void kmux_free(kcp_mux *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->nslots; i++) {
        if (m->slots[i]) {
            kcp_free(m->slots[i]->k);
            free(m->slots[i]);
        }
    }
    free(m->slots);
    free(m->free_sids);
    free(m->buckets);
    free(m->dirty);
    free(m->sbuf);
    free(m->rbuf);
    if (m->tfd > 0)
        close(m->tfd);
    if (m->efd > 0)
        close(m->efd);
    free(m);
}

int kmux_timer_fd(const kcp_mux *m) { return m->tfd; }

int kmux_poll_fd(const kcp_mux *m) { return m->efd; }

static void flush_sends(kcp_mux *m);

static void on_output(const uint8_t *data, uint32_t len, void *user)
{
    msess *s = (msess *)user;
    kcp_mux *m = s->mux;
    if (len > m->sslot)
        return;
    if (m->nsend == m->batch)
        flush_sends(m);
    int i = m->nsend++;
    memcpy(m->sbuf + (size_t)i * m->sslot, data, len);
    memcpy(m->saddr[i], s->addr, s->addrlen);
    m->siov[i].iov_base = m->sbuf + (size_t)i * m->sslot;
    m->siov[i].iov_len = len;
    memset(&m->smsg[i], 0, sizeof m->smsg[i]);
    if (!m->connected) { /* a connected socket reuses its cached route */
        m->smsg[i].msg_hdr.msg_name = m->saddr[i];
        m->smsg[i].msg_hdr.msg_namelen = s->addrlen;
    }
    m->smsg[i].msg_hdr.msg_iov = &m->siov[i];
    m->smsg[i].msg_hdr.msg_iovlen = 1;
    s->last_send = m->now;
}

static void flush_sends(kcp_mux *m)
{
    int off = 0;
    while (off < m->nsend) {
        int r = sendmmsg(m->fd, m->smsg + off, (unsigned)(m->nsend - off), MSG_DONTWAIT);
        m->st.syscalls_out++;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (m->recverr && !m->connected)
                m->errq_pending = 1; /* an ICMP error for one peer: not the socket's */
            else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOBUFS)
                m->pending_errno = errno;
            /* drop the rest: KCP retransmits */
            m->st.send_drops += (uint64_t)(m->nsend - off);
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOBUFS)
                off++;
            else
                break;
            continue;
        }
        for (int i = 0; i < r; i++)
            m->st.bytes_out += m->siov[off + i].iov_len;
        m->st.datagrams_out += (uint64_t)r;
        off += r;
    }
    m->nsend = 0;
}

int kmux_open(kcp_mux *m, const uint8_t *addr, uint32_t addrlen, uint32_t conv,
              const kmux_config *cfg)
{
    uint32_t now = kcp_now_ms();
    uint8_t key[20];
    uint32_t n = addr_key(addr, addrlen, key);
    if (!n || addrlen > 28)
        return -1;
    if (lookup(m, addr, addrlen, conv))
        return -2;
    if (cfg->mtu > (int)m->rslot && size_slots(m, (uint32_t)cfg->mtu) < 0)
        return -3;
    msess *s = (msess *)calloc(1, sizeof(msess));
    if (!s)
        return -3;
    s->k = kcp_new(conv);
    if (!s->k || kcp_set_mtu(s->k, cfg->mtu) < 0) {
        kcp_free(s->k);
        free(s);
        return -4;
    }
    kcp_set_stream(s->k, cfg->stream);
    kcp_set_wndsize(s->k, cfg->sndwnd, cfg->rcvwnd);
    kcp_set_nodelay(s->k, cfg->nodelay, cfg->interval, cfg->resend, cfg->nocwnd);
    kcp_set_dead_link(s->k, cfg->dead_link);
    kcp_set_ack_delay(s->k, cfg->ack_delay, cfg->ack_batch);
    kcp_set_output(s->k, on_output, s);
    s->mux = m;
    s->conv = conv;
    memcpy(s->addr, addr, addrlen);
    s->addrlen = addrlen;
    s->hash = hash_key(key, n, conv);
    s->notify_below = -1;
    s->last_recv = s->last_send = now;
    int sid;
    if (m->nfree) {
        sid = m->free_sids[--m->nfree];
    } else {
        if (m->nslots == m->cap_slots) {
            int cap = m->cap_slots ? m->cap_slots * 2 : 16;
            msess **sl = (msess **)realloc(m->slots, (size_t)cap * sizeof(msess *));
            if (!sl) {
                kcp_free(s->k);
                free(s);
                return -3;
            }
            m->slots = sl;
            int *fs = (int *)realloc(m->free_sids, (size_t)cap * sizeof(int));
            if (!fs) {
                kcp_free(s->k);
                free(s);
                return -3;
            }
            m->free_sids = fs;
            m->cap_slots = cap;
        }
        sid = m->nslots++;
    }
    s->sid = sid;
    m->slots[sid] = s;
    if (m->nsessions + 1 > m->nbuckets)
        grow_buckets(m);
    uint32_t b = s->hash & (m->nbuckets - 1);
    s->hnext = m->buckets[b];
    m->buckets[b] = s;
    m->nsessions++;
    return sid;
}

static msess *get(kcp_mux *m, int sid)
{
    if (sid < 0 || sid >= m->nslots)
        return NULL;
    return m->slots[sid];
}

void kmux_release(kcp_mux *m, int sid)
{
    msess *s = get(m, sid);
    if (!s)
        return;
    if (!s->dead) {
        m->now = kcp_now_ms();
        kcp_flush_acks(s->k, m->now);
        flush_sends(m);
    }
    msess **pp = &m->buckets[s->hash & (m->nbuckets - 1)];
    while (*pp && *pp != s)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = s->hnext;
    for (int i = 0; i < m->ndirty; i++)
        if (m->dirty[i] == sid)
            m->dirty[i] = -1;
    m->slots[sid] = NULL;
    m->free_sids[m->nfree++] = sid;
    m->nsessions--;
    kcp_free(s->k);
    free(s);
}

kcp_engine *kmux_engine(kcp_mux *m, int sid)
{
    msess *s = get(m, sid);
    return s ? s->k : NULL;
}

static void mark_dirty(kcp_mux *m, msess *s)
{
    if (s->dirty)
        return;
    if (m->ndirty == m->cap_dirty) {
        int cap = m->cap_dirty ? m->cap_dirty * 2 : 64;
        int *d = (int *)realloc(m->dirty, (size_t)cap * sizeof(int));
        if (!d)
            return;
        m->dirty = d;
        m->cap_dirty = cap;
    }
    m->dirty[m->ndirty++] = s->sid;
    s->dirty = 1;
}

int kmux_has_dirty(const kcp_mux *m) { return m->ndirty > 0; }

void kmux_set_established(kcp_mux *m, int sid, uint32_t idle_ms, uint32_t keepalive_ms)
{
    uint32_t now = kcp_now_ms();
    msess *s = get(m, sid);
    if (!s)
        return;
    s->established = 1;
    s->idle_ms = idle_ms;
    s->keepalive_ms = keepalive_ms;
    s->last_recv = s->last_send = now;
    mark_dirty(m, s);
}

void kmux_notify_below(kcp_mux *m, int sid, int64_t bytes)
{
    msess *s = get(m, sid);
    if (s) {
        s->notify_below = bytes;
        mark_dirty(m, s);
    }
}

int64_t kmux_write(kcp_mux *m, int sid, const uint8_t *data, size_t len, int flush,
                   kmux_event *ev, int maxev, int32_t *nev)
{
    int64_t queued = kmux_send(m, sid, data, len);
    *nev = 0;
    if (flush && queued >= 0) {
        *nev = kmux_flush(m, ev, maxev);
        msess *s = get(m, sid);
        queued = s ? (int64_t)kcp_pending_bytes(s->k) : -1;
    }
    return queued;
}

int64_t kmux_send(kcp_mux *m, int sid, const uint8_t *data, size_t len)
{
    msess *s = get(m, sid);
    if (!s || s->dead)
        return -1;
    int r = kcp_send(s->k, data, len);
    if (r < 0)
        return r;
    mark_dirty(m, s);
    return (int64_t)kcp_pending_bytes(s->k);
}

int kmux_read(kcp_mux *m, int sid, uint8_t *buf, size_t cap)
{
    msess *s = get(m, sid);
    if (!s)
        return -1;
    int r = kcp_recv(s->k, buf, cap);
    if (kcp_tell_pending(s->k))
        mark_dirty(m, s);
    return r;
}

/* ---- events -------------------------------------------------------------- */

static void recompute_deadline(msess *s, uint32_t now)
{
    int has;
    uint32_t t = kcp_check(s->k, now, &has);
    if (s->established && !s->dead) {
        uint32_t ka = s->last_send + s->keepalive_ms;
        uint32_t idle = s->last_recv + s->idle_ms;
        if (s->keepalive_ms && (!has || DIFF(ka, t) < 0)) {
            t = ka;
            has = 1;
        }
        if (s->idle_ms && (!has || DIFF(idle, t) < 0)) {
            t = idle;
            has = 1;
        }
    }
    s->deadline = t;
    s->has_deadline = has && !s->dead;
}

static int add_event(kmux_event *ev, int *n, int maxev, int32_t sid, int32_t type, int32_t err)
{
    if (*n >= maxev)
        return -1;
    kmux_event *e = &ev[(*n)++];
    memset(e, 0, sizeof *e);
    e->sid = sid;
    e->type = type;
    e->err = err;
    return 0;
}

static void after_flush(kcp_mux *m, msess *s, kmux_event *ev, int *n, int maxev)
{
    if (kcp_dead(s->k) && !s->dead) {
        if (add_event(ev, n, maxev, s->sid, KMUX_EV_DEAD, 1) == 0)
            s->dead = 1;
    }
    if (s->notify_below >= 0 && (int64_t)kcp_pending_bytes(s->k) <= s->notify_below) {
        if (add_event(ev, n, maxev, s->sid, KMUX_EV_WRITABLE, 0) == 0)
            s->notify_below = -1;
    }
    recompute_deadline(s, m->now);
}

/* Point the timerfd at the earliest session deadline, unless it already fires by then.
   A timerfd (watched by the event loop like the socket) keeps the loop's own waits
   untimed: no timer is set and cancelled around every wait. */
static void arm(kcp_mux *m, uint32_t now)
{
    int32_t d = kmux_next_delay(m, now);
    if (d < 0 || (m->timer_armed && DIFF(m->armed_at, now + (uint32_t)d) <= 0))
        return;
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = d / 1000;
    its.it_value.tv_nsec = d ? (long)(d % 1000) * 1000000L : 1; /* 0 would disarm */
    if (timerfd_settime(m->tfd, 0, &its, NULL) == 0) {
        m->timer_armed = 1;
        m->armed_at = now + (uint32_t)d;
    }
}

static void take_error(kcp_mux *m, kmux_event *ev, int *n, int maxev)
{
    if (m->pending_errno && add_event(ev, n, maxev, -1, KMUX_EV_ERROR, m->pending_errno) == 0)
        m->pending_errno = 0;
}

int kmux_flush(kcp_mux *m, kmux_event *ev, int maxev)
{
    int n = 0;
    uint32_t now = m->now = kcp_now_ms();
    /* sessions may be marked dirty again while flushing: walk by index */
    for (int i = 0; i < m->ndirty; i++) {
        msess *s = get(m, m->dirty[i]);
        if (!s)
            continue;
        s->dirty = 0;
        if (!s->dead)
            kcp_flush(s->k, now);
        after_flush(m, s, ev, &n, maxev);
    }
    m->ndirty = 0;
    flush_sends(m);
    take_error(m, ev, &n, maxev);
    arm(m, now);
    return n;
}

static void send_rst(kcp_mux *m, const uint8_t *addr, uint32_t addrlen, uint32_t conv)
{
    kmux_ctrl(m, addr, addrlen, conv, KCP_CTL_RST, 0, 0, 0, 0);
    m->st.resets_sent++;
}

static void on_datagram(kcp_mux *m, const uint8_t *data, uint32_t len, const uint8_t *addr,
                        uint32_t addrlen, kmux_event *ev, int *n, int maxev)
{
    m->st.datagrams_in++;
    m->st.bytes_in += len;
    if (len < KCP_HEADER) {
        m->st.dropped_short++;
        return;
    }
    uint32_t conv = (uint32_t)data[0] | ((uint32_t)data[1] << 8) | ((uint32_t)data[2] << 16) |
                    ((uint32_t)data[3] << 24);
    uint8_t cmd = data[4];
    if (cmd >= KCP_CTL_SYN && cmd <= KCP_CTL_COOKIE) {
        msess *s = lookup(m, addr, addrlen, conv);
        uint32_t ts = rd32(data + 8), sn = rd32(data + 12), una = rd32(data + 16);
        if (cmd == KCP_CTL_SYN && !s && m->cookie_ms) {
            /* an unverified address: a stateless answer, nothing kept, Python not woken */
            if (una != KCP_MAGIC) {
                m->st.dropped_bad_cmd++;
                return;
            }
            if (!cookie_check(m, addr, addrlen, conv, ts, sn))
                return;
        }
        if (*n >= maxev)
            return;
        kmux_event *e = &ev[(*n)++];
        memset(e, 0, sizeof *e);
        e->sid = s ? s->sid : -1;
        e->type = KMUX_EV_CTRL;
        e->conv = conv;
        e->cmd = cmd;
        e->frg = data[5];
        e->ts = ts;
        e->sn = sn;
        e->una = una;
        e->addrlen = (uint16_t)(addrlen > 28 ? 28 : addrlen);
        memcpy(e->addr, addr, e->addrlen);
        if (s)
            s->last_recv = m->now;
        return;
    }
    if (cmd < KCP_CMD_PUSH || cmd > KCP_CMD_WINS) {
        m->st.dropped_bad_cmd++;
        return;
    }
    msess *s = lookup(m, addr, addrlen, conv);
    if (!s) {
        m->st.dropped_unknown++;
        if (cmd == KCP_CMD_PUSH)
            send_rst(m, addr, addrlen, conv);
        return;
    }
    if (s->dead)
        return;
    if (kcp_input(s->k, data, len, m->now) < 0)
        m->st.dropped_malformed++;
    s->last_recv = m->now;
    /* flush now only if something is due now; delayed acks wait for a reply or the timer */
    int has;
    if ((DIFF(kcp_check(s->k, m->now, &has), m->now) <= 0 && has) ||
        (s->notify_below >= 0 && (int64_t)kcp_pending_bytes(s->k) <= s->notify_below))
        mark_dirty(m, s);
    else if (!s->dirty)
        recompute_deadline(s, m->now);
    if (!s->data_flag && kcp_readable(s->k)) {
        if (add_event(ev, n, maxev, s->sid, KMUX_EV_DATA, 0) == 0)
            s->data_flag = 1;
    }
}

int kmux_poll(kcp_mux *m, kmux_event *ev, int maxev, int hint, uint8_t *buf, size_t cap,
              int32_t *out)
{
    int n = 0, total = 0;
    int errors = 0;
    uint32_t now = m->now = kcp_now_ms();
    out[0] = out[1] = 0;
    while (n <= maxev - m->batch && total < POLL_BUDGET) {
        int r = recvmmsg(m->fd, m->rmsg, (unsigned)m->batch, MSG_DONTWAIT, NULL);
        m->st.syscalls_in++;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (m->recverr && !m->connected && ++errors < 8) {
                m->errq_pending = 1; /* one peer's ICMP error, reported once: read on */
                continue;
            }
            add_event(ev, &n, maxev, -1, KMUX_EV_ERROR, errno);
            break;
        }
        for (int i = 0; i < r; i++) {
            if (m->rmsg[i].msg_hdr.msg_flags & MSG_TRUNC) {
                m->st.datagrams_in++;
                m->st.dropped_oversize++;
                continue;
            }
            on_datagram(m, m->rbuf + (size_t)i * m->rslot, m->rmsg[i].msg_len,
                        (const uint8_t *)&m->raddr[i], m->rmsg[i].msg_hdr.msg_namelen, ev, &n,
                        maxev);
        }
        for (int i = 0; i < r; i++) { /* the kernel wrote these: restore them for next time */
            m->rmsg[i].msg_hdr.msg_namelen = sizeof m->raddr[i];
            m->rmsg[i].msg_hdr.msg_flags = 0;
        }
        total += r;
        if (r < m->batch)
            break;
    }
    /* woken without data: the error queue may be what made the socket readable */
    if (m->recverr && !m->connected && (m->errq_pending || total == 0))
        drain_errqueue(m, ev, &n, maxev);
    /* the hinted session's bytes go straight into the caller's buffer */
    msess *h = get(m, hint);
    if (h && cap && kcp_readable(h->k)) {
        int r = kcp_recv(h->k, buf, cap);
        out[0] = r > 0 ? r : 0;
        out[1] = kcp_readable(h->k) > 0;
        if (kcp_tell_pending(h->k))
            mark_dirty(m, h);
    }
    int kept = 0;
    for (int i = 0; i < n; i++) {
        if (ev[i].type == KMUX_EV_DATA) {
            msess *s = get(m, ev[i].sid);
            if (s)
                s->data_flag = 0;
            if (s && s == h && !out[1])
                continue; /* delivered through buf */
        }
        if (kept != i)
            ev[kept] = ev[i];
        kept++;
    }
    /* with sessions dirty the caller flushes next, and that flush arms the timer */
    if (!m->ndirty)
        arm(m, now);
    return kept;
}

int kmux_tick(kcp_mux *m, kmux_event *ev, int maxev)
{
    int n = 0;
    uint64_t expirations;
    uint32_t now = m->now = kcp_now_ms();
    if (read(m->tfd, &expirations, sizeof expirations) < 0 && errno != EAGAIN)
        return 0;
    m->timer_armed = 0;
    for (int i = 0; i < m->nslots && n < maxev; i++) {
        msess *s = m->slots[i];
        if (!s || s->dead || !s->has_deadline || DIFF(s->deadline, now) > 0)
            continue;
        if (s->established && s->idle_ms && DIFF(now, s->last_recv + s->idle_ms) >= 0) {
            if (add_event(ev, &n, maxev, s->sid, KMUX_EV_DEAD, 2) == 0) {
                s->dead = 1;
                s->has_deadline = 0;
            }
            continue;
        }
        if (s->established && s->keepalive_ms &&
            DIFF(now, s->last_send + s->keepalive_ms) >= 0) {
            kcp_tell_window(s->k);
            kcp_shrink(s->k); /* idle: an idle connection keeps no spare segments */
        }
        kcp_flush(s->k, now);
        after_flush(m, s, ev, &n, maxev);
    }
    flush_sends(m);
    take_error(m, ev, &n, maxev);
    arm(m, now);
    return n;
}

int32_t kmux_next_delay(kcp_mux *m, uint32_t now)
{
    int found = 0;
    int32_t best = 0;
    for (int i = 0; i < m->nslots; i++) {
        msess *s = m->slots[i];
        if (!s || !s->has_deadline)
            continue;
        int32_t d = DIFF(s->deadline, now);
        if (d < 0)
            d = 0;
        if (!found || d < best) {
            best = d;
            found = 1;
        }
    }
    return found ? best : -1;
}

int kmux_ctrl(kcp_mux *m, const uint8_t *addr, uint32_t addrlen, uint32_t conv, uint8_t cmd,
              uint8_t frg, uint32_t ts, uint32_t sn, uint32_t una)
{
    uint8_t p[KCP_HEADER];
    memset(p, 0, sizeof p);
    wr32(p, conv);
    p[4] = cmd;
    p[5] = frg;
    wr32(p + 8, ts);
    wr32(p + 12, sn);
    wr32(p + 16, una);
    ssize_t r = sendto(m->fd, p, sizeof p, MSG_DONTWAIT, (const struct sockaddr *)addr,
                       (socklen_t)addrlen);
    m->st.syscalls_out++;
    if (r < 0) {
        if (m->recverr && !m->connected)
            m->errq_pending = 1; /* an ICMP error surfaced here: its details are queued */
        return -errno;
    }
    m->st.datagrams_out++;
    m->st.bytes_out += sizeof p;
    return 0;
}

void kmux_get_stats(const kcp_mux *m, kmux_stats *out)
{
    *out = m->st;
    out->sessions = m->nsessions;
}
