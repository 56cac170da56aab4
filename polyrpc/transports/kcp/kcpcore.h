/* polyrpc KCP core: a KCP protocol engine plus a batched UDP multiplexer.
 *
 * Written for polyrpc from the protocol's description; wire-compatible with the
 * reference KCP (24-byte little-endian segment header, commands 81..84).
 *
 * Two layers:
 *   kcp_*   the sans-IO engine: feed datagrams in, get datagrams out, ask when
 *           the next timer is due. Used alone by the unit and interop tests.
 *   kmux_*  many engines on one non-blocking UDP socket, demultiplexed by
 *           (peer address, conv), with recvmmsg/sendmmsg batching. Python calls
 *           it once per readable socket / timer / flush and gets events back.
 */
#ifndef POLYRPC_KCPCORE_H
#define POLYRPC_KCPCORE_H

#include <stddef.h>
#include <stdint.h>

/* segment commands (KCP) */
#define KCP_CMD_PUSH 81
#define KCP_CMD_ACK 82
#define KCP_CMD_WASK 83
#define KCP_CMD_WINS 84
/* polyrpc control datagrams (outside KCP; same 24-byte header shape) */
#define KCP_CTL_SYN 0xC0
#define KCP_CTL_SYNACK 0xC1
#define KCP_CTL_FIN 0xC2
#define KCP_CTL_FINACK 0xC3
#define KCP_CTL_RST 0xC4
#define KCP_CTL_COOKIE 0xC5

#define KCP_MAGIC 0x50524B31 /* "PRK1" in SYN/SYNACK/COOKIE una: polyrpc's handshake */
#define KCP_HEADER 24
#define KCP_MAX_MTU 9000

typedef struct kcp_engine kcp_engine;

typedef struct kcp_stats {
    uint64_t in_datagrams, in_segments, in_bytes;
    uint64_t out_datagrams, out_segments;
    uint64_t retransmits, fast_retransmits, duplicates;
    uint64_t dropped_malformed, window_probes;
    int32_t srtt, rttvar, rto;
    uint32_t cwnd, rmt_wnd, snd_wnd, rcv_wnd;
    uint32_t snd_queue, snd_buf, rcv_queue, rcv_buf;
} kcp_stats;

/* clock: milliseconds from a monotonic clock, wrapping at 2**32 */
uint32_t kcp_now_ms(void);

/* ---- engine ---------------------------------------------------------- */
kcp_engine *kcp_new(uint32_t conv);
void kcp_free(kcp_engine *k);
/* any argument < 0 keeps the current value */
int kcp_set_mtu(kcp_engine *k, int mtu);
void kcp_set_wndsize(kcp_engine *k, int sndwnd, int rcvwnd);
void kcp_set_nodelay(kcp_engine *k, int nodelay, int interval, int resend, int nocwnd);
void kcp_set_stream(kcp_engine *k, int stream);
void kcp_set_dead_link(kcp_engine *k, int xmit_limit);
/* hold pure acks up to delay_ms so a reply can carry them, unless batch acks are owed */
void kcp_set_ack_delay(kcp_engine *k, int delay_ms, int batch);
/* queue bytes; 0 or <0 on error (-2: message needs more than 255 fragments) */
int kcp_send(kcp_engine *k, const uint8_t *data, size_t len);
/* stream mode: copy up to cap bytes; message mode: one whole message
   (-1 none ready, -3 buffer too small: see kcp_peeksize) */
int kcp_recv(kcp_engine *k, uint8_t *buf, size_t cap);
int kcp_peeksize(const kcp_engine *k);
size_t kcp_readable(const kcp_engine *k);
/* one datagram; 0 ok, <0 malformed (counted, rest of the datagram dropped) */
int kcp_input(kcp_engine *k, const uint8_t *data, size_t len, uint32_t now);
/* n datagrams laid end to end; returns how many were accepted */
int kcp_input_batch(kcp_engine *k, const uint8_t *data, const uint32_t *lens, int n, uint32_t now);
void kcp_flush(kcp_engine *k, uint32_t now);
/* send only the acknowledgements owed (e.g. before forgetting a finished session) */
void kcp_flush_acks(kcp_engine *k, uint32_t now);
/* absolute time (ms) of the next needed flush; has_deadline=0 if none */
uint32_t kcp_check(kcp_engine *k, uint32_t now, int *has_deadline);
/* sans-IO output queue (used when no output hook is installed) */
size_t kcp_output_size(const kcp_engine *k);
int kcp_take_output(kcp_engine *k, uint8_t *buf, size_t cap, uint32_t *lens, int maxn);
void kcp_tell_window(kcp_engine *k);
/* 1 if a window probe or window update waits to be sent */
int kcp_tell_pending(const kcp_engine *k);
/* replace the sans-IO queue by a hook called once per outgoing datagram */
void kcp_set_output(kcp_engine *k, void (*fn)(const uint8_t *, uint32_t, void *), void *user);
/* free what an idle engine keeps for speed (its segment pool, ack and output buffers) */
void kcp_shrink(kcp_engine *k);
uint32_t kcp_conv(const kcp_engine *k);
int kcp_dead(const kcp_engine *k);
uint32_t kcp_waitsnd(const kcp_engine *k);
uint64_t kcp_pending_bytes(const kcp_engine *k);
uint32_t kcp_final_sn(const kcp_engine *k);
uint32_t kcp_rcv_nxt(const kcp_engine *k);
void kcp_get_stats(const kcp_engine *k, kcp_stats *out);
uint64_t kcp_live_segments(void);

/* ---- multiplexer ----------------------------------------------------- */
typedef struct kcp_mux kcp_mux;

enum {
    KMUX_EV_DATA = 1,     /* sid has bytes to read */
    KMUX_EV_CTRL = 2,     /* control datagram (cmd, frg, sn, una, addr); sid -1 if unknown */
    KMUX_EV_DEAD = 3,     /* sid: err 1 dead link (retransmit limit), 2 idle timeout,
                             3 ICMP port unreachable for the peer (its process is gone) */
    KMUX_EV_WRITABLE = 4, /* sid: queued bytes fell to the armed mark */
    KMUX_EV_ERROR = 5     /* socket error: err = errno */
};

typedef struct kmux_event {
    int32_t sid;
    int32_t type;
    int32_t err;
    uint32_t conv;
    uint32_t ts;
    uint32_t sn;
    uint32_t una;
    uint8_t cmd;
    uint8_t frg;
    uint16_t addrlen;
    uint8_t addr[28];
} kmux_event;

typedef struct kmux_config {
    int mtu, sndwnd, rcvwnd, nodelay, interval, resend, nocwnd, stream, dead_link;
    int ack_delay, ack_batch;
} kmux_config;

typedef struct kmux_stats {
    uint64_t datagrams_in, datagrams_out, bytes_in, bytes_out;
    uint64_t dropped_short, dropped_oversize, dropped_bad_cmd, dropped_unknown;
    uint64_t dropped_malformed, send_drops, resets_sent, syscalls_in, syscalls_out;
    uint64_t cookies_sent, cookies_accepted, icmp_errors, peers_unreachable;
    uint32_t sessions;
} kmux_stats;

/* batch: datagrams per recvmmsg/sendmmsg (1..64); each costs two slots of max(2048, mtu) */
kcp_mux *kmux_new(int fd, int batch);
void kmux_free(kcp_mux *m);
/* the socket is connect()ed to its one peer: datagrams are sent without an address */
void kmux_set_connected(kcp_mux *m, int connected);
/* Stateless SYN cookies (a listener): a SYN for an unknown (address, conv) is answered
   with a COOKIE datagram computed from a secret, the address, the conv and a time bucket
   of bucket_ms, and reaches Python (as a CTRL event) only once it echoes a valid cookie.
   The secret is replaced every bucket; a cookie is valid for 1 to 2 buckets. 0: off. */
int kmux_set_cookies(kcp_mux *m, uint32_t bucket_ms);
/* The socket has IP_RECVERR/IPV6_RECVERR set: ICMP port unreachable for a session's peer
   (read from the error queue) ends that session (a DEAD event, err 3). */
int kmux_set_recverr(kcp_mux *m, int on);
int kmux_open(kcp_mux *m, const uint8_t *addr, uint32_t addrlen, uint32_t conv,
              const kmux_config *cfg);
/* free a session; its owed acknowledgements are sent first */
void kmux_release(kcp_mux *m, int sid);
kcp_engine *kmux_engine(kcp_mux *m, int sid);
void kmux_set_established(kcp_mux *m, int sid, uint32_t idle_ms, uint32_t keepalive_ms);
void kmux_notify_below(kcp_mux *m, int sid, int64_t bytes);
/* queue bytes; returns the bytes now queued or unacknowledged, or <0 on error */
int64_t kmux_send(kcp_mux *m, int sid, const uint8_t *data, size_t len);
int kmux_read(kcp_mux *m, int sid, uint8_t *buf, size_t cap);
/* The calls below read the clock themselves and keep the mux's timerfd (kmux_timer_fd)
   pointed at the earliest session deadline; call kmux_tick when it is readable.
   poll: drain the socket. The readable bytes of session ``hint`` (if any) are copied into
   buf (out[0] bytes; out[1] = 1 if more remain, then a DATA event is reported too).
   Returns the number of events. */
int kmux_poll(kcp_mux *m, kmux_event *ev, int maxev, int hint, uint8_t *buf, size_t cap,
              int32_t *out);
int kmux_flush(kcp_mux *m, kmux_event *ev, int maxev);
int kmux_tick(kcp_mux *m, kmux_event *ev, int maxev);
int kmux_timer_fd(const kcp_mux *m);
/* An epoll fd watching the socket for input: the event loop watches this one, so the
   socket's error state (an ICMP error, POLLERR) reaches kmux_poll as plain readability
   instead of the loop's own error handling (libuv stops a poll handle on POLLERR). */
int kmux_poll_fd(const kcp_mux *m);
/* kmux_send, then (if flush) kmux_flush (*nev = its events);
   returns the bytes queued or unacknowledged, <0 on error */
int64_t kmux_write(kcp_mux *m, int sid, const uint8_t *data, size_t len, int flush,
                   kmux_event *ev, int maxev, int32_t *nev);
int32_t kmux_next_delay(kcp_mux *m, uint32_t now);
int kmux_has_dirty(const kcp_mux *m);
int kmux_ctrl(kcp_mux *m, const uint8_t *addr, uint32_t addrlen, uint32_t conv, uint8_t cmd,
              uint8_t frg, uint32_t ts, uint32_t sn, uint32_t una);
/* SipHash-2-4 of data under a 16-byte key (the cookie's MAC; exported for its tests) */
uint64_t kcp_siphash24(const uint8_t *key, const uint8_t *data, size_t len);
void kmux_get_stats(const kcp_mux *m, kmux_stats *out);

/* address helpers: text <-> raw sockaddr bytes */
int kaddr_pack(const char *host, int port, uint8_t *out);
int kaddr_unpack(const uint8_t *addr, uint32_t addrlen, char *host, int cap, int *port);

#endif
