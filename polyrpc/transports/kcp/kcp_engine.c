/* The KCP protocol engine (sans-IO). See kcpcore.h and docs/transports/kcp.md.
 *
 * Sequence numbers and timestamps are u32 and compared through signed
 * differences so that they may wrap.
 */
#include "kcpcore.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DIFF(a, b) ((int32_t)((uint32_t)(a) - (uint32_t)(b)))

enum {
    RTO_NODELAY_MIN = 30,
    RTO_MIN = 100,
    RTO_DEFAULT = 200,
    RTO_MAX = 60000,
    WND_SND_DEFAULT = 32,
    WND_RCV_DEFAULT = 128,
    WND_RCV_MESSAGE_MIN = 128,
    MTU_DEFAULT = 1400,
    INTERVAL_DEFAULT = 100,
    DEAD_LINK_DEFAULT = 20,
    SSTHRESH_INIT = 2,
    SSTHRESH_MIN = 2,
    PROBE_INIT = 7000,
    PROBE_LIMIT = 120000,
    FASTLIMIT_DEFAULT = 5,
    MAX_FRAGMENTS = 255,
    POOL_LIMIT = 256,
    ASK_SEND = 1,
    ASK_TELL = 2
};

typedef struct seg {
    struct seg *prev, *next;
    uint32_t sn, frg, ts, resendts, rto, fastack, xmit, len, cap;
    uint8_t data[];
} seg;

typedef struct seglist {
    seg *head, *tail;
    uint32_t count;
} seglist;

typedef struct ackpair {
    uint32_t sn, ts;
} ackpair;

struct kcp_engine {
    uint32_t conv, mtu, mss, stream, dead;
    uint32_t snd_una, snd_nxt, rcv_nxt;
    uint32_t ssthresh, cwnd, incr, snd_wnd, rcv_wnd, rmt_wnd;
    int32_t rx_srtt, rx_rttval, rx_rto, rx_minrto;
    uint32_t current, interval, nodelay, fastresend, nocwnd, fastlimit, dead_link;
    uint32_t probe, ts_probe, probe_wait;
    uint32_t ack_delay, ack_batch, ack_since; /* delayed acks (0: ack at every flush) */
    seglist snd_queue, snd_buf, rcv_queue, rcv_buf;
    uint32_t rcv_head_off; /* stream mode: bytes of rcv_queue.head already read */
    uint64_t pending;      /* bytes in snd_queue + snd_buf */
    uint64_t queued_rcv;   /* bytes in rcv_queue not yet read */
    ackpair *acks;
    uint32_t nacks, acks_cap;
    seg *pool;
    uint32_t npool;
    uint8_t *obuf;
    uint32_t olen;
    /* output: a hook, or the sans-IO queue of length-prefixed datagrams */
    void (*output)(const uint8_t *data, uint32_t len, void *user);
    void *user;
    uint8_t *outq;
    size_t outq_len, outq_cap, outq_off;
    kcp_stats st;
};

/* Segments alive across all engines: lets tests prove that closing frees everything. */
static uint64_t live_segments;

uint64_t kcp_live_segments(void) { return live_segments; }

uint32_t kcp_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

/* ---- segment lists and pool ------------------------------------------ */

static void list_push_tail(seglist *l, seg *s)
{
    s->next = NULL;
    s->prev = l->tail;
    if (l->tail)
        l->tail->next = s;
    else
        l->head = s;
    l->tail = s;
    l->count++;
}

static void list_insert_after(seglist *l, seg *pos, seg *s)
{
    if (pos == NULL) { /* at head */
        s->prev = NULL;
        s->next = l->head;
        if (l->head)
            l->head->prev = s;
        else
            l->tail = s;
        l->head = s;
    } else {
        s->prev = pos;
        s->next = pos->next;
        if (pos->next)
            pos->next->prev = s;
        else
            l->tail = s;
        pos->next = s;
    }
    l->count++;
}

static void list_unlink(seglist *l, seg *s)
{
    if (s->prev)
        s->prev->next = s->next;
    else
        l->head = s->next;
    if (s->next)
        s->next->prev = s->prev;
    else
        l->tail = s->prev;
    l->count--;
}

static seg *seg_alloc(kcp_engine *k, uint32_t cap)
{
    seg *s;
    if (cap <= k->mss && k->pool) {
        s = k->pool;
        k->pool = s->next;
        k->npool--;
    } else {
        uint32_t size = cap < k->mss ? k->mss : cap;
        s = (seg *)malloc(sizeof(seg) + size);
        if (!s)
            return NULL;
        s->cap = size;
        live_segments++;
    }
    s->prev = s->next = NULL;
    s->sn = s->frg = s->ts = s->resendts = s->rto = s->fastack = s->xmit = s->len = 0;
    return s;
}

static void seg_release(kcp_engine *k, seg *s)
{
    if (s->cap == k->mss && k->npool < POOL_LIMIT) {
        s->next = k->pool;
        k->pool = s;
        k->npool++;
    } else {
        free(s);
        live_segments--;
    }
}

static void list_free(kcp_engine *k, seglist *l)
{
    seg *s = l->head;
    while (s) {
        seg *n = s->next;
        free(s);
        live_segments--;
        s = n;
    }
    l->head = l->tail = NULL;
    l->count = 0;
    (void)k;
}

static void pool_drain(kcp_engine *k)
{
    while (k->pool) {
        seg *n = k->pool->next;
        free(k->pool);
        live_segments--;
        k->pool = n;
    }
    k->npool = 0;
}

/* ---- construction and settings ---------------------------------------- */

kcp_engine *kcp_new(uint32_t conv)
{
    kcp_engine *k = (kcp_engine *)calloc(1, sizeof(kcp_engine));
    if (!k)
        return NULL;
    k->conv = conv;
    k->snd_wnd = WND_SND_DEFAULT;
    k->rcv_wnd = WND_RCV_DEFAULT;
    k->rmt_wnd = WND_RCV_DEFAULT;
    k->rx_rto = RTO_DEFAULT;
    k->rx_minrto = RTO_MIN;
    k->interval = INTERVAL_DEFAULT;
    k->ssthresh = SSTHRESH_INIT;
    k->cwnd = 1;
    k->fastlimit = FASTLIMIT_DEFAULT;
    k->dead_link = DEAD_LINK_DEFAULT;
    if (kcp_set_mtu(k, MTU_DEFAULT) < 0) {
        free(k);
        return NULL;
    }
    return k;
}

void kcp_free(kcp_engine *k)
{
    if (!k)
        return;
    list_free(k, &k->snd_queue);
    list_free(k, &k->snd_buf);
    list_free(k, &k->rcv_queue);
    list_free(k, &k->rcv_buf);
    pool_drain(k);
    free(k->acks);
    free(k->obuf);
    free(k->outq);
    free(k);
}

int kcp_set_mtu(kcp_engine *k, int mtu)
{
    if (mtu < 0)
        return 0;
    if (mtu < 50 || mtu > KCP_MAX_MTU)
        return -1;
    uint8_t *buf = (uint8_t *)malloc((size_t)mtu);
    if (!buf)
        return -2;
    /* queued send segments were sized for the old mss: keep them, only new ones change */
    pool_drain(k);
    free(k->obuf);
    k->obuf = buf;
    k->olen = 0;
    k->mtu = (uint32_t)mtu;
    k->mss = k->mtu - KCP_HEADER;
    return 0;
}

void kcp_set_wndsize(kcp_engine *k, int sndwnd, int rcvwnd)
{
    if (sndwnd > 0)
        k->snd_wnd = (uint32_t)sndwnd;
    if (rcvwnd > 0)
        k->rcv_wnd = (uint32_t)rcvwnd;
    if (!k->stream && k->rcv_wnd < WND_RCV_MESSAGE_MIN)
        k->rcv_wnd = WND_RCV_MESSAGE_MIN;
}

void kcp_set_nodelay(kcp_engine *k, int nodelay, int interval, int resend, int nocwnd)
{
    if (nodelay >= 0) {
        k->nodelay = (uint32_t)nodelay;
        k->rx_minrto = nodelay ? RTO_NODELAY_MIN : RTO_MIN;
    }
    if (interval >= 0) {
        if (interval < 10)
            interval = 10;
        if (interval > 5000)
            interval = 5000;
        k->interval = (uint32_t)interval;
    }
    if (resend >= 0)
        k->fastresend = (uint32_t)resend;
    if (nocwnd >= 0)
        k->nocwnd = (uint32_t)nocwnd;
}

void kcp_set_stream(kcp_engine *k, int stream)
{
    k->stream = stream ? 1 : 0;
    if (!k->stream && k->rcv_wnd < WND_RCV_MESSAGE_MIN)
        k->rcv_wnd = WND_RCV_MESSAGE_MIN;
}

void kcp_set_dead_link(kcp_engine *k, int xmit_limit)
{
    if (xmit_limit > 0)
        k->dead_link = (uint32_t)xmit_limit;
}

void kcp_set_ack_delay(kcp_engine *k, int delay_ms, int batch)
{
    k->ack_delay = (uint32_t)(delay_ms < 0 ? 0 : delay_ms);
    k->ack_batch = (uint32_t)(batch < 1 ? 1 : batch);
}


void kcp_shrink(kcp_engine *k)
{
    pool_drain(k);
    if (k->nacks == 0) {
        free(k->acks);
        k->acks = NULL;
        k->acks_cap = 0;
    }
    if (k->outq_len == 0) {
        free(k->outq);
        k->outq = NULL;
        k->outq_cap = k->outq_off = 0;
    }
}

uint32_t kcp_conv(const kcp_engine *k) { return k->conv; }
int kcp_dead(const kcp_engine *k) { return (int)k->dead; }
uint32_t kcp_waitsnd(const kcp_engine *k) { return k->snd_buf.count + k->snd_queue.count; }
uint64_t kcp_pending_bytes(const kcp_engine *k) { return k->pending; }
uint32_t kcp_final_sn(const kcp_engine *k) { return k->snd_nxt + k->snd_queue.count; }
uint32_t kcp_rcv_nxt(const kcp_engine *k) { return k->rcv_nxt; }
void kcp_tell_window(kcp_engine *k) { k->probe |= ASK_TELL; }
int kcp_tell_pending(const kcp_engine *k) { return k->probe != 0; }

void kcp_set_output(kcp_engine *k, void (*fn)(const uint8_t *, uint32_t, void *), void *user)
{
    k->output = fn;
    k->user = user;
}

void kcp_get_stats(const kcp_engine *k, kcp_stats *out)
{
    *out = k->st;
    out->srtt = k->rx_srtt;
    out->rttvar = k->rx_rttval;
    out->rto = k->rx_rto;
    out->cwnd = k->cwnd;
    out->rmt_wnd = k->rmt_wnd;
    out->snd_wnd = k->snd_wnd;
    out->rcv_wnd = k->rcv_wnd;
    out->snd_queue = k->snd_queue.count;
    out->snd_buf = k->snd_buf.count;
    out->rcv_queue = k->rcv_queue.count;
    out->rcv_buf = k->rcv_buf.count;
}

/* ---- sending side ------------------------------------------------------ */

int kcp_send(kcp_engine *k, const uint8_t *data, size_t len)
{
    if (k->stream) {
        if (len == 0)
            return 0;
        seg *tail = k->snd_queue.tail;
        if (tail && tail->len < k->mss && tail->cap >= k->mss) {
            size_t room = k->mss - tail->len;
            size_t n = len < room ? len : room;
            memcpy(tail->data + tail->len, data, n);
            tail->len += (uint32_t)n;
            k->pending += n;
            data += n;
            len -= n;
        }
        while (len > 0) {
            size_t n = len < k->mss ? len : k->mss;
            seg *s = seg_alloc(k, k->mss);
            if (!s)
                return -1;
            memcpy(s->data, data, n);
            s->len = (uint32_t)n;
            list_push_tail(&k->snd_queue, s);
            k->pending += n;
            data += n;
            len -= n;
        }
        return 0;
    }
    size_t count = len <= k->mss ? 1 : (len + k->mss - 1) / k->mss;
    if (count > MAX_FRAGMENTS)
        return -2;
    for (size_t i = 0; i < count; i++) {
        size_t n = len < k->mss ? len : k->mss;
        seg *s = seg_alloc(k, (uint32_t)n);
        if (!s)
            return -1;
        if (n)
            memcpy(s->data, data, n);
        s->len = (uint32_t)n;
        s->frg = (uint32_t)(count - i - 1);
        list_push_tail(&k->snd_queue, s);
        k->pending += n;
        data += n;
        len -= n;
    }
    return 0;
}

static void emit_datagram(kcp_engine *k)
{
    if (k->olen == 0)
        return;
    k->st.out_datagrams++;
    if (k->output) {
        k->output(k->obuf, k->olen, k->user);
    } else {
        size_t need = k->outq_len + 4 + k->olen;
        if (need > k->outq_cap) {
            size_t cap = k->outq_cap ? k->outq_cap * 2 : 65536;
            while (cap < need)
                cap *= 2;
            uint8_t *q = (uint8_t *)realloc(k->outq, cap);
            if (!q) {
                k->olen = 0;
                return;
            }
            k->outq = q;
            k->outq_cap = cap;
        }
        put32(k->outq + k->outq_len, k->olen);
        memcpy(k->outq + k->outq_len + 4, k->obuf, k->olen);
        k->outq_len = need;
    }
    k->olen = 0;
}

static uint32_t wnd_unused(const kcp_engine *k)
{
    return k->rcv_queue.count < k->rcv_wnd ? k->rcv_wnd - k->rcv_queue.count : 0;
}

static void emit_segment(kcp_engine *k, uint8_t cmd, uint32_t frg, uint32_t ts, uint32_t sn,
                         const uint8_t *data, uint32_t len)
{
    if (k->olen + KCP_HEADER + len > k->mtu)
        emit_datagram(k);
    uint8_t *p = k->obuf + k->olen;
    uint32_t wnd = wnd_unused(k);
    put32(p, k->conv);
    p[4] = cmd;
    p[5] = (uint8_t)frg;
    p[6] = (uint8_t)(wnd > 0xffff ? 0xffff : wnd);
    p[7] = (uint8_t)((wnd > 0xffff ? 0xffff : wnd) >> 8);
    put32(p + 8, ts);
    put32(p + 12, sn);
    put32(p + 16, k->rcv_nxt);
    put32(p + 20, len);
    if (len)
        memcpy(p + KCP_HEADER, data, len);
    k->olen += KCP_HEADER + len;
    k->st.out_segments++;
}

static uint32_t effective_cwnd(const kcp_engine *k)
{
    uint32_t c = k->snd_wnd < k->rmt_wnd ? k->snd_wnd : k->rmt_wnd;
    if (!k->nocwnd && k->cwnd < c)
        c = k->cwnd;
    return c;
}

void kcp_flush(kcp_engine *k, uint32_t now)
{
    k->current = now;
    for (uint32_t i = 0; i < k->nacks; i++)
        emit_segment(k, KCP_CMD_ACK, 0, k->acks[i].ts, k->acks[i].sn, NULL, 0);
    k->nacks = 0;

    if (k->rmt_wnd == 0) {
        if (k->probe_wait == 0) {
            k->probe_wait = PROBE_INIT;
            k->ts_probe = now + k->probe_wait;
        } else if (DIFF(now, k->ts_probe) >= 0) {
            if (k->probe_wait < PROBE_INIT)
                k->probe_wait = PROBE_INIT;
            k->probe_wait += k->probe_wait / 2;
            if (k->probe_wait > PROBE_LIMIT)
                k->probe_wait = PROBE_LIMIT;
            k->ts_probe = now + k->probe_wait;
            k->probe |= ASK_SEND;
        }
    } else {
        k->ts_probe = 0;
        k->probe_wait = 0;
    }
    if (k->probe & ASK_SEND) {
        emit_segment(k, KCP_CMD_WASK, 0, 0, 0, NULL, 0);
        k->st.window_probes++;
    }
    if (k->probe & ASK_TELL)
        emit_segment(k, KCP_CMD_WINS, 0, 0, 0, NULL, 0);
    k->probe = 0;

    uint32_t cwnd = effective_cwnd(k);
    while (k->snd_queue.head && DIFF(k->snd_nxt, k->snd_una + cwnd) < 0) {
        seg *s = k->snd_queue.head;
        list_unlink(&k->snd_queue, s);
        s->sn = k->snd_nxt++;
        s->ts = now;
        s->resendts = now;
        s->rto = (uint32_t)k->rx_rto;
        s->fastack = 0;
        s->xmit = 0;
        list_push_tail(&k->snd_buf, s);
    }

    uint32_t resent = k->fastresend > 0 ? k->fastresend : 0xffffffffu;
    uint32_t rtomin = k->nodelay == 0 ? (uint32_t)(k->rx_rto >> 3) : 0;
    int change = 0, lost = 0;
    for (seg *s = k->snd_buf.head; s; s = s->next) {
        int send = 0;
        if (s->xmit == 0) {
            send = 1;
            s->xmit = 1;
            s->rto = (uint32_t)k->rx_rto;
            s->resendts = now + s->rto + rtomin;
        } else if (DIFF(now, s->resendts) >= 0) {
            send = 1;
            s->xmit++;
            k->st.retransmits++;
            if (k->nodelay == 0)
                s->rto += s->rto > (uint32_t)k->rx_rto ? s->rto : (uint32_t)k->rx_rto;
            else
                s->rto += (k->nodelay < 2 ? s->rto : (uint32_t)k->rx_rto) / 2;
            s->resendts = now + s->rto;
            lost = 1;
        } else if (s->fastack >= resent && (k->fastlimit == 0 || s->xmit <= k->fastlimit)) {
            send = 1;
            s->xmit++;
            s->fastack = 0;
            s->resendts = now + s->rto;
            k->st.fast_retransmits++;
            change = 1;
        }
        if (send) {
            s->ts = now;
            emit_segment(k, KCP_CMD_PUSH, s->frg, s->ts, s->sn, s->data, s->len);
            if (s->xmit >= k->dead_link)
                k->dead = 1;
        }
    }
    emit_datagram(k);

    if (change) {
        uint32_t inflight = k->snd_nxt - k->snd_una;
        k->ssthresh = inflight / 2 < SSTHRESH_MIN ? SSTHRESH_MIN : inflight / 2;
        k->cwnd = k->ssthresh + resent;
        k->incr = k->cwnd * k->mss;
    }
    if (lost) {
        k->ssthresh = cwnd / 2 < SSTHRESH_MIN ? SSTHRESH_MIN : cwnd / 2;
        k->cwnd = 1;
        k->incr = k->mss;
    }
    if (k->cwnd < 1) {
        k->cwnd = 1;
        k->incr = k->mss;
    }
}

void kcp_flush_acks(kcp_engine *k, uint32_t now)
{
    k->current = now;
    for (uint32_t i = 0; i < k->nacks; i++)
        emit_segment(k, KCP_CMD_ACK, 0, k->acks[i].ts, k->acks[i].sn, NULL, 0);
    k->nacks = 0;
    emit_datagram(k);
}

uint32_t kcp_check(kcp_engine *k, uint32_t now, int *has_deadline)
{
    *has_deadline = 1;
    if (k->probe)
        return now;
    if (k->snd_queue.head && DIFF(k->snd_nxt, k->snd_una + effective_cwnd(k)) < 0)
        return now;
    uint32_t resent = k->fastresend > 0 ? k->fastresend : 0xffffffffu;
    int found = 0;
    uint32_t t = now;
    if (k->nacks) {
        if (k->ack_delay == 0 || k->nacks >= k->ack_batch)
            return now;
        t = k->ack_since + k->ack_delay;
        found = 1;
    }
    for (seg *s = k->snd_buf.head; s; s = s->next) {
        if (s->xmit == 0)
            return now;
        if (s->fastack >= resent && (k->fastlimit == 0 || s->xmit <= k->fastlimit))
            return now;
        if (!found || DIFF(s->resendts, t) < 0) {
            t = s->resendts;
            found = 1;
        }
    }
    if (k->rmt_wnd == 0) {
        if (k->probe_wait == 0)
            return now;
        if (!found || DIFF(k->ts_probe, t) < 0) {
            t = k->ts_probe;
            found = 1;
        }
    }
    if (!found) {
        *has_deadline = 0;
        return now;
    }
    return DIFF(t, now) < 0 ? now : t;
}

size_t kcp_output_size(const kcp_engine *k) { return k->outq_len - k->outq_off; }

int kcp_take_output(kcp_engine *k, uint8_t *buf, size_t cap, uint32_t *lens, int maxn)
{
    int n = 0;
    size_t used = 0;
    while (n < maxn && k->outq_off < k->outq_len) {
        uint32_t len = get32(k->outq + k->outq_off);
        if (used + len > cap)
            break;
        memcpy(buf + used, k->outq + k->outq_off + 4, len);
        lens[n++] = len;
        used += len;
        k->outq_off += 4 + len;
    }
    if (k->outq_off == k->outq_len)
        k->outq_off = k->outq_len = 0;
    return n;
}

/* ---- receiving side ---------------------------------------------------- */

static void update_rtt(kcp_engine *k, int32_t rtt)
{
    /* the sample comes from the timestamp the peer echoes: one from a forged or broken peer
       can be up to 2**31 ms, and the sums below would overflow (found by fuzzing) */
    if (rtt > RTO_MAX)
        rtt = RTO_MAX;
    if (k->rx_srtt == 0) {
        k->rx_srtt = rtt;
        k->rx_rttval = rtt / 2;
    } else {
        int32_t delta = rtt > k->rx_srtt ? rtt - k->rx_srtt : k->rx_srtt - rtt;
        k->rx_rttval = (3 * k->rx_rttval + delta) / 4;
        k->rx_srtt = (7 * k->rx_srtt + rtt) / 8;
        if (k->rx_srtt < 1)
            k->rx_srtt = 1;
    }
    int32_t var = 4 * k->rx_rttval;
    int32_t rto = k->rx_srtt + ((int32_t)k->interval > var ? (int32_t)k->interval : var);
    if (rto < k->rx_minrto)
        rto = k->rx_minrto;
    if (rto > RTO_MAX)
        rto = RTO_MAX;
    k->rx_rto = rto;
}

static void shrink_una(kcp_engine *k)
{
    k->snd_una = k->snd_buf.head ? k->snd_buf.head->sn : k->snd_nxt;
}

static void drop_acked(kcp_engine *k, seg *s)
{
    list_unlink(&k->snd_buf, s);
    k->pending -= s->len;
    seg_release(k, s);
}

static void on_una(kcp_engine *k, uint32_t una)
{
    while (k->snd_buf.head && DIFF(k->snd_buf.head->sn, una) < 0)
        drop_acked(k, k->snd_buf.head);
}

static void on_ack(kcp_engine *k, uint32_t sn)
{
    if (DIFF(sn, k->snd_una) < 0 || DIFF(sn, k->snd_nxt) >= 0)
        return;
    for (seg *s = k->snd_buf.head; s; s = s->next) {
        if (s->sn == sn) {
            drop_acked(k, s);
            return;
        }
        if (DIFF(sn, s->sn) < 0)
            return;
    }
}

static void on_fastack(kcp_engine *k, uint32_t maxack)
{
    if (DIFF(maxack, k->snd_una) < 0 || DIFF(maxack, k->snd_nxt) >= 0)
        return;
    for (seg *s = k->snd_buf.head; s; s = s->next) {
        if (DIFF(maxack, s->sn) <= 0)
            break;
        s->fastack++;
    }
}

static int push_ack(kcp_engine *k, uint32_t sn, uint32_t ts)
{
    if (k->nacks == k->acks_cap) {
        uint32_t cap = k->acks_cap ? k->acks_cap * 2 : 64;
        ackpair *a = (ackpair *)realloc(k->acks, cap * sizeof(ackpair));
        if (!a)
            return -1;
        k->acks = a;
        k->acks_cap = cap;
    }
    if (k->nacks == 0)
        k->ack_since = k->current;
    k->acks[k->nacks].sn = sn;
    k->acks[k->nacks].ts = ts;
    k->nacks++;
    return 0;
}

static void move_ready(kcp_engine *k)
{
    while (k->rcv_buf.head && k->rcv_buf.head->sn == k->rcv_nxt &&
           k->rcv_queue.count < k->rcv_wnd) {
        seg *s = k->rcv_buf.head;
        list_unlink(&k->rcv_buf, s);
        list_push_tail(&k->rcv_queue, s);
        k->queued_rcv += s->len;
        k->rcv_nxt++;
    }
}

static void on_data(kcp_engine *k, uint32_t sn, uint32_t frg, const uint8_t *data, uint32_t len)
{
    if (DIFF(sn, k->rcv_nxt + k->rcv_wnd) >= 0 || DIFF(sn, k->rcv_nxt) < 0) {
        k->st.duplicates++;
        return;
    }
    seg *pos = k->rcv_buf.tail;
    while (pos && DIFF(pos->sn, sn) > 0)
        pos = pos->prev;
    if (pos && pos->sn == sn) {
        k->st.duplicates++;
        return;
    }
    seg *s = seg_alloc(k, len);
    if (!s)
        return;
    s->sn = sn;
    s->frg = frg;
    s->len = len;
    if (len)
        memcpy(s->data, data, len);
    list_insert_after(&k->rcv_buf, pos, s);
    move_ready(k);
}

/* Check every segment of a datagram before acting on any: all or nothing. */
static int validate(const kcp_engine *k, const uint8_t *data, size_t len)
{
    while (len >= KCP_HEADER) {
        uint8_t cmd = data[4];
        uint32_t dlen = get32(data + 20);
        if (get32(data) != k->conv)
            return -1;
        if (dlen > len - KCP_HEADER)
            return -2;
        if (cmd < KCP_CMD_PUSH || cmd > KCP_CMD_WINS)
            return -3;
        if (DIFF(get32(data + 16), k->snd_nxt) > 0) /* acknowledges data never sent */
            return -4;
        data += KCP_HEADER + dlen;
        len -= KCP_HEADER + dlen;
    }
    return len ? -5 : 0; /* trailing bytes shorter than a header */
}

int kcp_input(kcp_engine *k, const uint8_t *data, size_t len, uint32_t now)
{
    k->current = now;
    k->st.in_datagrams++;
    if (len < KCP_HEADER) {
        k->st.dropped_malformed++;
        return -1;
    }
    int rc = validate(k, data, len);
    if (rc < 0) {
        k->st.dropped_malformed++;
        return rc;
    }
    uint32_t prev_una = k->snd_una;
    uint32_t maxack = 0;
    int have_maxack = 0;
    while (len >= KCP_HEADER) {
        uint8_t cmd = data[4];
        uint32_t frg = data[5];
        uint32_t wnd = (uint32_t)data[6] | ((uint32_t)data[7] << 8);
        uint32_t ts = get32(data + 8);
        uint32_t sn = get32(data + 12);
        uint32_t una = get32(data + 16);
        uint32_t dlen = get32(data + 20);
        k->st.in_segments++;
        k->rmt_wnd = wnd;
        on_una(k, una);
        shrink_una(k);
        if (cmd == KCP_CMD_ACK) {
            if (DIFF(now, ts) >= 0)
                update_rtt(k, DIFF(now, ts));
            on_ack(k, sn);
            shrink_una(k);
            if (!have_maxack || DIFF(sn, maxack) > 0) {
                maxack = sn;
                have_maxack = 1;
            }
        } else if (cmd == KCP_CMD_PUSH) {
            if (DIFF(sn, k->rcv_nxt + k->rcv_wnd) < 0) {
                push_ack(k, sn, ts);
                k->st.in_bytes += dlen;
                on_data(k, sn, frg, data + KCP_HEADER, dlen);
            } else {
                k->st.duplicates++;
            }
        } else if (cmd == KCP_CMD_WASK) {
            k->probe |= ASK_TELL;
        }
        data += KCP_HEADER + dlen;
        len -= KCP_HEADER + dlen;
    }
    if (have_maxack)
        on_fastack(k, maxack);
    if (DIFF(k->snd_una, prev_una) > 0 && k->cwnd < k->rmt_wnd) {
        uint32_t mss = k->mss;
        if (k->cwnd < k->ssthresh) {
            k->cwnd++;
            k->incr += mss;
        } else {
            if (k->incr < mss)
                k->incr = mss;
            k->incr += (mss * mss) / k->incr + (mss / 16);
            if ((k->cwnd + 1) * mss <= k->incr)
                k->cwnd = (k->incr + mss - 1) / (mss ? mss : 1);
        }
        if (k->cwnd > k->rmt_wnd) {
            k->cwnd = k->rmt_wnd;
            k->incr = k->rmt_wnd * mss;
        }
    }
    return 0;
}

int kcp_input_batch(kcp_engine *k, const uint8_t *data, const uint32_t *lens, int n, uint32_t now)
{
    int ok = 0;
    for (int i = 0; i < n; i++) {
        if (kcp_input(k, data, lens[i], now) == 0)
            ok++;
        data += lens[i];
    }
    return ok;
}

int kcp_peeksize(const kcp_engine *k)
{
    const seg *s = k->rcv_queue.head;
    if (!s)
        return -1;
    if (s->frg == 0)
        return (int)s->len;
    if (k->rcv_queue.count < s->frg + 1)
        return -1;
    int size = 0;
    for (; s; s = s->next) {
        size += (int)s->len;
        if (s->frg == 0)
            break;
    }
    return size;
}

size_t kcp_readable(const kcp_engine *k)
{
    if (k->stream)
        return (size_t)(k->queued_rcv - k->rcv_head_off);
    int n = kcp_peeksize(k);
    return n < 0 ? 0 : (size_t)(n ? n : 1);
}

int kcp_recv(kcp_engine *k, uint8_t *buf, size_t cap)
{
    int recover = k->rcv_queue.count >= k->rcv_wnd;
    size_t got = 0;
    if (k->stream) {
        while (k->rcv_queue.head && got < cap) {
            seg *s = k->rcv_queue.head;
            size_t avail = s->len - k->rcv_head_off;
            size_t n = avail < cap - got ? avail : cap - got;
            memcpy(buf + got, s->data + k->rcv_head_off, n);
            got += n;
            if (n == avail) {
                list_unlink(&k->rcv_queue, s);
                k->queued_rcv -= s->len;
                k->rcv_head_off = 0;
                seg_release(k, s);
            } else {
                k->rcv_head_off += (uint32_t)n;
            }
        }
    } else {
        int size = kcp_peeksize(k);
        if (size < 0)
            return -1;
        if ((size_t)size > cap)
            return -3;
        while (k->rcv_queue.head) {
            seg *s = k->rcv_queue.head;
            uint32_t frg = s->frg;
            memcpy(buf + got, s->data, s->len);
            got += s->len;
            list_unlink(&k->rcv_queue, s);
            k->queued_rcv -= s->len;
            seg_release(k, s);
            if (frg == 0)
                break;
        }
    }
    move_ready(k);
    if (recover && k->rcv_queue.count < k->rcv_wnd)
        k->probe |= ASK_TELL;
    return (int)got;
}
