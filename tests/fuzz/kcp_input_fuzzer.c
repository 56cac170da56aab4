/* libFuzzer harness for the KCP engine (polyrpc/transports/kcp/kcp_engine.c): everything a
 * peer can make it do. The input is a small program: two configuration bytes, then
 * operations (feed a datagram or a batch of them, send, flush at a later time, receive,
 * take the output, check the timer) so that hostile datagrams meet an engine with data in
 * flight, half-built messages and owed acknowledgements, not just a fresh one.
 * Built and run by scripts/fuzz.sh (clang -fsanitize=fuzzer,address,undefined). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kcpcore.h"

#define CONV 0x11223344u

typedef struct {
    const uint8_t *p;
    size_t n;
} cursor;

static uint32_t take_byte(cursor *c)
{
    if (!c->n)
        return 0;
    c->n--;
    return *c->p++;
}

static uint32_t take_u16(cursor *c)
{
    uint32_t lo = take_byte(c);
    return lo | (take_byte(c) << 8);
}

/* up to want bytes of the input (fewer at its end) */
static const uint8_t *take_bytes(cursor *c, size_t want, size_t *got)
{
    const uint8_t *p = c->p;
    *got = want < c->n ? want : c->n;
    c->p += *got;
    c->n -= *got;
    return p;
}

static uint8_t scratch[1 << 18];
static uint32_t lens[64];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cursor c = {data, size};
    kcp_engine *k = kcp_new(CONV);
    if (!k)
        return 0;
    uint32_t cfg = take_u16(&c);
    kcp_set_stream(k, cfg & 1);
    if (cfg & 2)
        kcp_set_nodelay(k, 1, 10, 2, 1);
    kcp_set_wndsize(k, 1 + ((cfg >> 2) & 7) * 37, 1 + ((cfg >> 5) & 7) * 37);
    kcp_set_mtu(k, (cfg & 0x100) ? 50 + (int)((cfg >> 9) & 7) * 200 : -1);
    kcp_set_dead_link(k, (cfg & 0x1000) ? 3 : -1);
    kcp_set_ack_delay(k, (cfg & 0x2000) ? 20 : 0, (cfg >> 14) & 3);
    uint32_t now = 1000 + (cfg & 0x8000 ? 0xFFFFF000u : 0); /* also across the clock's wrap */
    int has_deadline;
    while (c.n) {
        size_t got;
        const uint8_t *p;
        switch (take_byte(&c) % 8) {
        case 0:
        case 1: /* one datagram */
            p = take_bytes(&c, take_u16(&c) % (KCP_MAX_MTU + 1), &got);
            kcp_input(k, p, got, now);
            break;
        case 2: { /* a batch of datagrams laid end to end */
            int n = 1 + (int)(take_byte(&c) % 8);
            size_t total = 0;
            for (int i = 0; i < n; i++) {
                lens[i] = take_u16(&c) % 2048;
                total += lens[i];
            }
            p = take_bytes(&c, total, &got);
            for (int i = 0; i < n; i++) { /* trim the lengths to the bytes there are */
                if (lens[i] > got)
                    lens[i] = (uint32_t)got;
                got -= lens[i];
            }
            kcp_input_batch(k, p, lens, n, now);
            break;
        }
        case 3: { /* send: bytes of the input, or a big zero message (fragments) */
            uint32_t len = take_u16(&c);
            if (len & 1) {
                kcp_send(k, scratch, (size_t)(len >> 1) * 8);
            } else {
                p = take_bytes(&c, len >> 1, &got);
                kcp_send(k, p, got);
            }
            break;
        }
        case 4: /* time passes, then a flush */
            now += take_byte(&c) * (take_byte(&c) & 1 ? 97u : 1u);
            kcp_flush(k, now);
            break;
        case 5: { /* receive everything ready, into a buffer of the size the input says */
            size_t cap = take_u16(&c) % sizeof(scratch);
            kcp_peeksize(k);
            for (int i = 0; i < 4096 && kcp_readable(k) > 0; i++) /* cap 0 reads nothing */
                if (kcp_recv(k, scratch, cap) < 0)
                    break;
            break;
        }
        case 6: /* what would go on the wire */
            while (kcp_take_output(k, scratch, sizeof(scratch), lens, 64) > 0)
                ;
            break;
        default: /* the timer and the small calls around it */
            kcp_check(k, now, &has_deadline);
            kcp_flush_acks(k, now);
            kcp_tell_window(k);
            kcp_tell_pending(k);
            kcp_waitsnd(k);
            kcp_pending_bytes(k);
            break;
        }
    }
    kcp_stats st;
    kcp_get_stats(k, &st);
    kcp_free(k);
    return 0;
}
