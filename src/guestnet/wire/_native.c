/*
 * guestnet.wire._native: the per-frame leaf operations of the datapath in C.
 *
 * Theory of operation: the core's per-packet paths spend most of their time in Python's
 * per-call and per-object costs (struct unpacking into a dozen ints, slices, the checksum as a
 * big integer), not in the work itself. This module does the leaf operations -- the Internet
 * checksum, the parse of an established-flow TCP frame or a unicast UDP datagram from the
 * guest (IPv4 or IPv6; fast_parse: whichever of the four the ethertype and protocol name, in
 * one call per frame), a plain DNS query's question, a SYN's TCP options, the headers of a TCP
 * or UDP frame toward the guest with their checksums, the IPv4 header parse -- in one call
 * each, against the buffer protocol. guestnet/wire/pure.py holds the same functions in Python with the
 * same results (a property test compares them byte for byte); guestnet/wire/native.py chooses
 * this module unless GUESTNET_PURE=1 or it failed to build.
 *
 * Frames from the guest are hostile: every read is bounds-checked against the buffer's length,
 * and a frame that does not fit returns None (tcp_fast4/6) or raises WireError (parse_ipv4)
 * exactly where the Python code does. Builders write only inside the buffer they are given and
 * raise ValueError/OverflowError where the Python code's struct.pack_into raises struct.error.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *WireError; /* guestnet.wire.WireError */

/* ---------------------------------------------------------------------------------------- */
/* The Internet checksum (RFC 1071)                                                          */

/* Ones'-complement sum of ``n`` bytes as big-endian 16-bit words, folded to 16 bits; 0 only
 * for all-zero data (end-around carry never turns a non-zero sum into 0). Summed as native
 * 32-bit words into 64 bits and byte-swapped at the end (the sum is byte-order independent,
 * RFC 1071 2(B)). */
static uint32_t
sum16(const unsigned char *p, Py_ssize_t n)
{
    uint64_t acc = 0;
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        uint32_t a, b, c, d;
        memcpy(&a, p + i, 4);
        memcpy(&b, p + i + 4, 4);
        memcpy(&c, p + i + 8, 4);
        memcpy(&d, p + i + 12, 4);
        acc += (uint64_t)a + b + c + d;
    }
    for (; i + 4 <= n; i += 4) {
        uint32_t a;
        memcpy(&a, p + i, 4);
        acc += a;
    }
    for (; i + 2 <= n; i += 2) {
        uint16_t a;
        memcpy(&a, p + i, 2);
        acc += a;
    }
#if PY_LITTLE_ENDIAN
    if (i < n)
        acc += p[i]; /* the high byte of a big-endian word padded with zero */
#else
    if (i < n)
        acc += (uint32_t)p[i] << 8;
#endif
    while (acc > 0xffff)
        acc = (acc & 0xffff) + (acc >> 16);
#if PY_LITTLE_ENDIAN
    acc = ((acc & 0xff) << 8) | (acc >> 8);
#endif
    return (uint32_t)acc;
}

static uint32_t
fold(uint64_t v)
{
    while (v > 0xffff)
        v = (v & 0xffff) + (v >> 16);
    return (uint32_t)v;
}

/* The pseudo-header sum of wire/checksum.py: (src + dst) as one integer modulo 0xffff, plus the
 * protocol and length, folded. The modulo of a non-zero multiple of 0xffff is 0 there, not
 * 0xffff, which the folded ones' sum would give: keep the Python result. */
static uint32_t
pseudo(const unsigned char *src, Py_ssize_t slen, const unsigned char *dst, Py_ssize_t dlen,
       uint64_t proto, uint64_t length)
{
    uint64_t s = 0;
    /* Both lengths even (4 or 16 for real addresses): two word sums. Otherwise the integer's
     * 16-bit digits count from its last byte: weigh each byte by its distance from the end. */
    if (!((slen | dlen) & 1)) {
        s = fold((uint64_t)sum16(src, slen) + sum16(dst, dlen));
    }
    else {
        Py_ssize_t i, n = slen + dlen;
        uint64_t acc = 0;
        for (i = 0; i < n; i++) {
            unsigned v = i < slen ? src[i] : dst[i - slen];
            acc += ((n - 1 - i) & 1) ? (uint64_t)v << 8 : v;
        }
        s = fold(acc);
    }
    if (s == 0xffff)
        s = 0;
    return fold(s + proto + length);
}

static int
get_initial(PyObject *obj, uint64_t *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (v > ((uint64_t)1 << 62)) {
        PyErr_SetString(PyExc_OverflowError, "initial sum too large");
        return -1;
    }
    *out = v;
    return 0;
}

static PyObject *
ones_sum_common(PyObject *const *args, Py_ssize_t nargs, int complement)
{
    Py_buffer view;
    uint64_t initial = 0;
    uint32_t s;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "expected (data, initial=0)");
        return NULL;
    }
    if (nargs == 2 && get_initial(args[1], &initial) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    s = sum16((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    s = fold((uint64_t)s + initial);
    return PyLong_FromUnsignedLong(complement ? (~s & 0xffff) : s);
}

static PyObject *
n_ones_sum(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return ones_sum_common(args, nargs, 0);
}

static PyObject *
n_checksum(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return ones_sum_common(args, nargs, 1);
}

/* A bytes-like argument of any length: a bytes object directly, else through the buffer
 * protocol (released by release_arg). */
typedef struct {
    const unsigned char *p;
    Py_ssize_t n;
    Py_buffer view;
    int have_view;
} arg_bytes;

static int
get_arg(PyObject *obj, arg_bytes *a)
{
    a->have_view = 0;
    if (PyBytes_CheckExact(obj)) {
        a->p = (const unsigned char *)PyBytes_AS_STRING(obj);
        a->n = PyBytes_GET_SIZE(obj);
        return 0;
    }
    if (PyObject_GetBuffer(obj, &a->view, PyBUF_SIMPLE) < 0)
        return -1;
    a->have_view = 1;
    a->p = (const unsigned char *)a->view.buf;
    a->n = a->view.len;
    return 0;
}

static void
release_arg(arg_bytes *a)
{
    if (a->have_view) {
        PyBuffer_Release(&a->view);
        a->have_view = 0;
    }
}

static int
get_u64(PyObject *obj, uint64_t max, uint64_t *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (v > max) {
        PyErr_SetString(PyExc_OverflowError, "field value out of range");
        return -1;
    }
    *out = v;
    return 0;
}

static PyObject *
n_pseudo_sum(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    arg_bytes src, dst;
    uint64_t proto, length;
    uint32_t s;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "expected (src, dst, proto, length)");
        return NULL;
    }
    if (get_u64(args[2], (uint64_t)1 << 40, &proto) < 0 ||
        get_u64(args[3], (uint64_t)1 << 40, &length) < 0)
        return NULL;
    if (get_arg(args[0], &src) < 0)
        return NULL;
    if (get_arg(args[1], &dst) < 0) {
        release_arg(&src);
        return NULL;
    }
    s = pseudo(src.p, src.n, dst.p, dst.n, proto, length);
    release_arg(&src);
    release_arg(&dst);
    return PyLong_FromUnsignedLong(s);
}

/* ---------------------------------------------------------------------------------------- */
/* Guest frames in: the established-flow TCP fast path and the IPv4 header                    */

static inline unsigned
be16(const unsigned char *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

static inline uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void
put16(unsigned char *p, unsigned v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static inline void
put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* True when ``obj`` is a bytes-like object equal to the 6 bytes at ``mac``. */
static int
mac_equals(PyObject *obj, const unsigned char *mac)
{
    if (PyBytes_CheckExact(obj))
        return PyBytes_GET_SIZE(obj) == 6 && memcmp(PyBytes_AS_STRING(obj), mac, 6) == 0;
    return 0;
}

/* The tags fast_parse puts first in its tuples (FAST_TCP4... in guestnet/wire/pure.py). */
enum { FAST_TCP4 = 0, FAST_TCP6 = 1, FAST_UDP4 = 2, FAST_UDP6 = 3 };

/* A tuple of the ``n`` objects in ``items`` (stolen, even on failure; a NULL among them is an
 * earlier failure whose exception is set), preceded by the int ``tag`` when tag >= 0. */
static PyObject *
pack(int tag, Py_ssize_t n, PyObject **items)
{
    Py_ssize_t off = tag >= 0, i;
    PyObject *t = NULL;
    for (i = 0; i < n; i++)
        if (items[i] == NULL)
            goto fail;
    t = PyTuple_New(n + off);
    if (t == NULL)
        goto fail;
    if (off) {
        PyObject *k = PyLong_FromLong(tag);
        if (k == NULL) {
            Py_DECREF(t);
            goto fail;
        }
        PyTuple_SET_ITEM(t, 0, k);
    }
    for (i = 0; i < n; i++)
        PyTuple_SET_ITEM(t, off + i, items[i]);
    return t;
fail:
    for (i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    return NULL;
}

/* The tuple the fast path hands to the TCP NAT: (l4, src, dst, sport, dport, seq, ack, hlen,
 * flags, window), after ``tag`` when tag >= 0. Steals ``sip`` and ``dip``. */
static PyObject *
fast_tuple(int tag, PyObject *frame, Py_ssize_t l4_start, Py_ssize_t l4_end, PyObject *sip,
           PyObject *dip, const unsigned char *tcp, unsigned hlen)
{
    PyObject *items[10];
    items[0] = PySequence_GetSlice(frame, l4_start, l4_end);
    items[1] = sip;
    items[2] = dip;
    items[3] = PyLong_FromUnsignedLong(be16(tcp));
    items[4] = PyLong_FromUnsignedLong(be16(tcp + 2));
    items[5] = PyLong_FromUnsignedLong(be32(tcp + 4));
    items[6] = PyLong_FromUnsignedLong(be32(tcp + 8));
    items[7] = PyLong_FromUnsignedLong(hlen);
    items[8] = PyLong_FromUnsignedLong(tcp[13]);
    items[9] = PyLong_FromUnsignedLong(be16(tcp + 14));
    return pack(tag, 10, items);
}

/* The tuple of the UDP fast parses: (src, dst, sport, dport, payload), after ``tag`` when
 * tag >= 0; the addresses are ``alen`` bytes at ``ip_src`` and right after it. */
static PyObject *
udp_tuple(int tag, PyObject *frame, Py_ssize_t pl_start, Py_ssize_t pl_end,
          const unsigned char *ip_src, Py_ssize_t alen, const unsigned char *udp)
{
    PyObject *items[5];
    PyObject *payload = PySequence_GetSlice(frame, pl_start, pl_end);
    if (payload == NULL)
        return NULL;
    items[0] = PyBytes_FromStringAndSize((const char *)ip_src, alen);
    items[1] = PyBytes_FromStringAndSize((const char *)ip_src + alen, alen);
    items[2] = PyLong_FromUnsignedLong(be16(udp));
    items[3] = PyLong_FromUnsignedLong(be16(udp + 2));
    items[4] = payload;
    return pack(tag, 5, items);
}

/* Membership of ``dip`` in a set of addresses; -1 on error. */
static int
in_set(PyObject *set, PyObject *item)
{
    if (set == Py_None)
        return 0;
    return PySequence_Contains(set, item);
}

/* True when the TCP segment's checksum is right (its ones' sum with the pseudo-header's is
 * 0xffff), as verify_tcp says. */
static int
tcp_sum_ok(const unsigned char *seg, Py_ssize_t n, const unsigned char *src,
           const unsigned char *dst, Py_ssize_t alen)
{
    uint32_t ps = pseudo(src, alen, dst, alen, 6, (uint64_t)n);
    return fold((uint64_t)sum16(seg, n) + ps) == 0xffff;
}

/* The shared part of the IPv4 fast parses: an Ethernet II IPv4 frame of protocol `proto` with
 * a bare 20-byte header, not a fragment, from `guest_mac` to `our_mac`, its total length at
 * least `min_total` and inside the frame, to a unicast address. 1 and *total_len set, or 0. */
static int
plain_ipv4(PyObject *our_mac, PyObject *guest_mac, const unsigned char *p, Py_ssize_t len,
           int proto, unsigned min_total, unsigned *total_len)
{
    const unsigned char *ip = p + 14;
    unsigned n = be16(ip + 2);
    if (be16(p + 12) != 0x0800 || ip[0] != 0x45 || ip[9] != proto || (be16(ip + 6) & 0x3fff) ||
        !mac_equals(our_mac, p) || !mac_equals(guest_mac, p + 6) || n < min_total ||
        (Py_ssize_t)n > len - 14 || ip[16] >= 224)
        return 0;
    *total_len = n;
    return 1;
}

/* The rest of them, after their transport checks: not to `broadcast` (the subnet's), and the
 * IPv4 header checksum right. 1, 0, or -1 with an exception (a bad `broadcast` argument). */
static int
ipv4_unicast_ok(PyObject *broadcast, const unsigned char *ip)
{
    arg_bytes bc;
    int hit;
    if (get_arg(broadcast, &bc) < 0)
        return -1;
    hit = bc.n == 4 && memcmp(bc.p, ip + 16, 4) == 0;
    release_arg(&bc);
    if (hit)
        return 0;
    {
        uint32_t s = sum16(ip, 20);
        return s == 0 || s == 0xffff;
    }
}

/*
 * The four fast parses on a buffer already held (``p``, ``len``: the frame's; ``frame``: the
 * object, sliced for the views returned). Each returns a new reference to its tuple (tagged
 * with ``tag`` when >= 0), to None, or NULL with an exception. The module functions tcp_fast4..
 * udp_fast6 call them untagged; fast_parse picks the one the ethertype and protocol name.
 */

static PyObject *
tcp4_core(PyObject *frame, const unsigned char *p, Py_ssize_t len, PyObject *our_mac,
          PyObject *guest_mac, PyObject *broadcast, PyObject *dns_dsts, int verify, int tag)
{
    const unsigned char *ip, *tcp;
    unsigned total_len, hlen, dport;
    PyObject *sip, *dip;
    int ok;
    if (len < 54)
        Py_RETURN_NONE;
    ip = p + 14;
    tcp = ip + 20;
    hlen = (tcp[12] >> 4) * 4;
    if (!plain_ipv4(our_mac, guest_mac, p, len, 6, 40, &total_len) || hlen < 20 ||
        hlen > total_len - 20)
        Py_RETURN_NONE;
    ok = ipv4_unicast_ok(broadcast, ip);
    if (ok < 0)
        return NULL;
    if (!ok)
        Py_RETURN_NONE;
    if (verify && !tcp_sum_ok(tcp, (Py_ssize_t)total_len - 20, ip + 12, ip + 16, 4))
        Py_RETURN_NONE;
    dport = be16(tcp + 2);
    dip = PyBytes_FromStringAndSize((const char *)ip + 16, 4);
    if (dip == NULL)
        return NULL;
    if (dport == 53) {
        int r = in_set(dns_dsts, dip);
        if (r != 0) {
            Py_DECREF(dip);
            if (r < 0)
                return NULL;
            Py_RETURN_NONE;
        }
    }
    sip = PyBytes_FromStringAndSize((const char *)ip + 12, 4);
    if (sip == NULL) {
        Py_DECREF(dip);
        return NULL;
    }
    return fast_tuple(tag, frame, 34, 14 + (Py_ssize_t)total_len, sip, dip, tcp, hlen);
}

static PyObject *
tcp6_core(PyObject *frame, const unsigned char *p, Py_ssize_t len, PyObject *our_mac,
          PyObject *guest_mac, PyObject *dns6_dsts, int verify, int tag)
{
    const unsigned char *ip, *tcp;
    unsigned plen, hlen, dport;
    PyObject *sip, *dip;
    if (len < 74)
        Py_RETURN_NONE;
    ip = p + 14;
    tcp = ip + 40;
    plen = be16(ip + 4);
    hlen = (tcp[12] >> 4) * 4;
    if (be16(p + 12) != 0x86dd || ip[6] != 6 || (ip[0] >> 4) != 6 || !mac_equals(our_mac, p) ||
        !mac_equals(guest_mac, p + 6) || hlen < 20 || hlen > plen ||
        (Py_ssize_t)plen > len - 54 || ip[24] == 0xff)
        Py_RETURN_NONE;
    if (verify && !tcp_sum_ok(tcp, (Py_ssize_t)plen, ip + 8, ip + 24, 16))
        Py_RETURN_NONE;
    dport = be16(tcp + 2);
    dip = PyBytes_FromStringAndSize((const char *)ip + 24, 16);
    if (dip == NULL)
        return NULL;
    if (dport == 53) {
        int r = in_set(dns6_dsts, dip);
        if (r != 0) {
            Py_DECREF(dip);
            if (r < 0)
                return NULL;
            Py_RETURN_NONE;
        }
    }
    sip = PyBytes_FromStringAndSize((const char *)ip + 8, 16);
    if (sip == NULL) {
        Py_DECREF(dip);
        return NULL;
    }
    return fast_tuple(tag, frame, 54, 54 + (Py_ssize_t)plen, sip, dip, tcp, hlen);
}

static PyObject *
udp4_core(PyObject *frame, const unsigned char *p, Py_ssize_t len, PyObject *our_mac,
          PyObject *guest_mac, PyObject *broadcast, int verify, int tag)
{
    const unsigned char *ip, *udp;
    unsigned total_len, ulen;
    int ok;
    if (len < 42 || len > 14 + 4 + 65535)
        Py_RETURN_NONE;
    ip = p + 14;
    udp = ip + 20;
    ulen = be16(udp + 4);
    if (!plain_ipv4(our_mac, guest_mac, p, len, 17, 28, &total_len) || ulen < 8 ||
        ulen > total_len - 20)
        Py_RETURN_NONE;
    ok = ipv4_unicast_ok(broadcast, ip);
    if (ok < 0)
        return NULL;
    if (!ok)
        Py_RETURN_NONE;
    if (verify && (udp[6] | udp[7])) {
        uint32_t ps = pseudo(ip + 12, 4, ip + 16, 4, 17, (uint64_t)ulen);
        if (fold((uint64_t)sum16(udp, ulen) + ps) != 0xffff)
            Py_RETURN_NONE;
    }
    return udp_tuple(tag, frame, 42, 34 + (Py_ssize_t)ulen, ip + 12, 4, udp);
}

static PyObject *
udp6_core(PyObject *frame, const unsigned char *p, Py_ssize_t len, PyObject *our_mac,
          PyObject *guest_mac, int verify, int tag)
{
    static const unsigned char unspecified[16];
    const unsigned char *ip, *udp;
    unsigned plen, ulen;
    if (len < 62 || len > 14 + 4 + 65535)
        Py_RETURN_NONE;
    ip = p + 14;
    udp = ip + 40;
    plen = be16(ip + 4);
    ulen = be16(udp + 4);
    if (be16(p + 12) != 0x86dd || (ip[0] >> 4) != 6 || ip[6] != 17 || !mac_equals(our_mac, p) ||
        !mac_equals(guest_mac, p + 6) || ulen < 8 || ulen > plen ||
        (Py_ssize_t)plen > len - 54 || ip[8] == 0xff || ip[24] == 0xff ||
        memcmp(ip + 24, unspecified, 16) == 0)
        Py_RETURN_NONE;
    if (verify) {
        uint32_t ps;
        if (!(udp[6] | udp[7]))
            Py_RETURN_NONE; /* IPv6 makes the UDP checksum mandatory */
        ps = pseudo(ip + 8, 16, ip + 24, 16, 17, (uint64_t)ulen);
        if (fold((uint64_t)sum16(udp, ulen) + ps) != 0xffff)
            Py_RETURN_NONE;
    }
    return udp_tuple(tag, frame, 62, 54 + (Py_ssize_t)ulen, ip + 8, 16, udp);
}

/* The arguments' count check and ``verify`` (args[nargs - 1]) and the frame's buffer, shared by
 * the module functions below. 0, or -1 with an exception. */
static int
fast_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, int *verify, Py_buffer *view)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments", want);
        return -1;
    }
    *verify = PyObject_IsTrue(args[want - 1]);
    if (*verify < 0)
        return -1;
    return PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE);
}

/* tcp_fast4(frame, our_mac, guest_mac, broadcast, dns_dsts, verify): see wire/pure.py. */
static PyObject *
n_tcp_fast4(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    PyObject *r;
    int verify;
    if (fast_args(args, nargs, 6, &verify, &view) < 0)
        return NULL;
    r = tcp4_core(args[0], view.buf, view.len, args[1], args[2], args[3], args[4], verify, -1);
    PyBuffer_Release(&view);
    return r;
}

/* tcp_fast6(frame, our_mac, guest_mac, dns6_dsts, verify): see guestnet/wire/pure.py. */
static PyObject *
n_tcp_fast6(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    PyObject *r;
    int verify;
    if (fast_args(args, nargs, 5, &verify, &view) < 0)
        return NULL;
    r = tcp6_core(args[0], view.buf, view.len, args[1], args[2], args[3], verify, -1);
    PyBuffer_Release(&view);
    return r;
}

/* udp_fast4(frame, our_mac, guest_mac, broadcast, verify) -> (src, dst, sport, dport, payload)
 * or None: see guestnet/wire/pure.py. */
static PyObject *
n_udp_fast4(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    PyObject *r;
    int verify;
    if (fast_args(args, nargs, 5, &verify, &view) < 0)
        return NULL;
    r = udp4_core(args[0], view.buf, view.len, args[1], args[2], args[3], verify, -1);
    PyBuffer_Release(&view);
    return r;
}

/* udp_fast6(frame, our_mac, guest_mac, verify) -> (src, dst, sport, dport, payload) or None:
 * see guestnet/wire/pure.py. */
static PyObject *
n_udp_fast6(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    PyObject *r;
    int verify;
    if (fast_args(args, nargs, 4, &verify, &view) < 0)
        return NULL;
    r = udp6_core(args[0], view.buf, view.len, args[1], args[2], verify, -1);
    PyBuffer_Release(&view);
    return r;
}

/* fast_parse(frame, our_mac, guest_mac, broadcast, dns_dsts, dns6_dsts, verify) -> (kind,
 * *fields) or None: the one of the four above that the ethertype and the IP protocol name, its
 * fields after its kind; see guestnet/wire/pure.py. */
static PyObject *
n_fast_parse(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    const unsigned char *p;
    PyObject *r = NULL;
    int tried = 0, verify;
    if (fast_args(args, nargs, 7, &verify, &view) < 0)
        return NULL;
    p = (const unsigned char *)view.buf;
    if (view.len >= 42) {
        unsigned et = be16(p + 12);
        tried = 1;
        if (et == 0x0800) {
            if (p[23] == 17)
                r = udp4_core(args[0], p, view.len, args[1], args[2], args[3], verify, FAST_UDP4);
            else if (p[23] == 6)
                r = tcp4_core(args[0], p, view.len, args[1], args[2], args[3], args[4], verify,
                              FAST_TCP4);
            else
                tried = 0;
        } else if (et == 0x86dd && view.len >= 62) {
            if (p[20] == 17)
                r = udp6_core(args[0], p, view.len, args[1], args[2], verify, FAST_UDP6);
            else if (p[20] == 6)
                r = tcp6_core(args[0], p, view.len, args[1], args[2], args[5], verify, FAST_TCP6);
            else
                tried = 0;
        } else
            tried = 0;
    }
    PyBuffer_Release(&view);
    if (!tried)
        Py_RETURN_NONE; /* no fast kind: not IPv4 or IPv6 with TCP or UDP */
    return r;           /* the core's tuple, its None, or NULL */
}

/* dns_question(data) -> (ident, question, name_len) or None: see guestnet/wire/pure.py. */
static PyObject *
n_dns_question(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    const unsigned char *p;
    Py_ssize_t n, off, name_end;
    unsigned ident, rdlen;
    PyObject *question;
    char *q;
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "expected 1 argument");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    p = (const unsigned char *)view.buf;
    n = view.len;
    /* Header: a query (QR clear, opcode 0), one question, no answer or authority records, at
     * most one additional record. */
    if (n < 12 || (p[2] & 0xf8) || be16(p + 4) != 1 || be16(p + 6) || be16(p + 8) ||
        be16(p + 10) > 1)
        goto no;
    /* The name: plain labels (no pointer, no other label type), at most 255 bytes in all. */
    off = 12;
    for (;;) {
        unsigned len;
        if (off >= n)
            goto no;
        len = p[off];
        if (len == 0)
            break;
        if (len >= 0x40)
            goto no;
        off += 1 + len;
        if (off - 12 >= 255) /* with the root's byte still to come: over 255 */
            goto no;
    }
    name_end = off + 1;
    off = name_end + 4;
    if (off > n)
        goto no;
    if (be16(p + 10)) {
        /* The one additional record: OPT, its owner the root, its data within the message. */
        if (off + 11 > n || p[off] != 0 || be16(p + off + 1) != 41)
            goto no;
        rdlen = be16(p + off + 9);
        off += 11 + rdlen;
    }
    if (off != n)
        goto no;
    ident = be16(p);
    question = PyBytes_FromStringAndSize(NULL, name_end + 4 - 12);
    if (question == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    q = PyBytes_AS_STRING(question);
    for (off = 12; off < name_end; off++) {
        unsigned char c = p[off];
        q[off - 12] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    memcpy(q + (name_end - 12), p + name_end, 4);
    PyBuffer_Release(&view);
    return Py_BuildValue("(INn)", ident, question, name_end - 12);
no:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *
wire_error(const char *reason)
{
    PyObject *exc = PyObject_CallFunction(WireError, "s", reason);
    if (exc != NULL) {
        PyErr_SetObject(WireError, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* parse_ipv4(data, verify) -> (header_len, tos, total_len, ident, frag, ttl, proto, src, dst),
 * the fields of guestnet.wire.ipv4.IPv4Header, or WireError with the Python code's reason. */
static PyObject *
n_parse_ipv4(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    const unsigned char *p;
    unsigned header_len, total_len;
    int verify;
    PyObject *res;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "expected (data, verify)");
        return NULL;
    }
    verify = PyObject_IsTrue(args[1]);
    if (verify < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    p = (const unsigned char *)view.buf;
    if (view.len < 20) {
        PyBuffer_Release(&view);
        return wire_error("ipv4.truncated");
    }
    if (p[0] >> 4 != 4) {
        PyBuffer_Release(&view);
        return wire_error("ipv4.bad_version");
    }
    header_len = (p[0] & 0x0f) * 4;
    total_len = be16(p + 2);
    if (header_len < 20) {
        PyBuffer_Release(&view);
        return wire_error("ipv4.bad_header_length");
    }
    if (total_len < header_len || (Py_ssize_t)total_len > view.len) {
        PyBuffer_Release(&view);
        return wire_error("ipv4.bad_total_length");
    }
    if (verify && sum16(p, header_len) != 0xffff) {
        PyBuffer_Release(&view);
        return wire_error("ipv4.bad_checksum");
    }
    res = Py_BuildValue("(IIIIIIIy#y#)", header_len, (unsigned)p[1], total_len, be16(p + 4),
                        be16(p + 6), (unsigned)p[8], (unsigned)p[9], (const char *)p + 12,
                        (Py_ssize_t)4, (const char *)p + 16, (Py_ssize_t)4);
    PyBuffer_Release(&view);
    return res;
}

/* tcp_options(data, header_len) -> (mss, wscale, sack_permitted, timestamp): the options of a
 * TCP segment between byte 20 and header_len, as guestnet.wire.pure.tcp_options reads them
 * (None for an option absent; wscale capped at 14; timestamp (TSval, TSecr)). An option that
 * runs past the header is WireError("tcp.bad_option"); header_len beyond the data ValueError. */
static PyObject *
n_tcp_options(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    const unsigned char *p;
    Py_ssize_t hlen, i;
    long mss = -1, wscale = -1;
    int sack = 0, have_ts = 0;
    uint32_t tsval = 0, tsecr = 0;
    PyObject *res, *o_mss, *o_ws, *o_ts;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "expected (data, header_len)");
        return NULL;
    }
    hlen = PyLong_AsSsize_t(args[1]);
    if (hlen == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (hlen > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "header_len beyond the segment");
        return NULL;
    }
    p = (const unsigned char *)view.buf;
    i = 20;
    while (i < hlen) {
        unsigned kind = p[i], olen;
        if (kind == 0)
            break;
        if (kind == 1) {
            i++;
            continue;
        }
        if (i + 1 >= hlen) {
            PyBuffer_Release(&view);
            return wire_error("tcp.bad_option");
        }
        olen = p[i + 1];
        if (olen < 2 || i + (Py_ssize_t)olen > hlen) {
            PyBuffer_Release(&view);
            return wire_error("tcp.bad_option");
        }
        if (kind == 2 && olen == 4) {
            mss = ((long)p[i + 2] << 8) | p[i + 3];
        } else if (kind == 3 && olen == 3) {
            wscale = p[i + 2] < 14 ? p[i + 2] : 14;
        } else if (kind == 4 && olen == 2) {
            sack = 1;
        } else if (kind == 8 && olen == 10) {
            tsval = (uint32_t)p[i + 2] << 24 | (uint32_t)p[i + 3] << 16 |
                    (uint32_t)p[i + 4] << 8 | p[i + 5];
            tsecr = (uint32_t)p[i + 6] << 24 | (uint32_t)p[i + 7] << 16 |
                    (uint32_t)p[i + 8] << 8 | p[i + 9];
            have_ts = 1;
        }
        i += olen;
    }
    PyBuffer_Release(&view);
    if (mss >= 0) {
        o_mss = PyLong_FromLong(mss);
    } else {
        o_mss = Py_None;
        Py_INCREF(o_mss);
    }
    if (wscale >= 0) {
        o_ws = PyLong_FromLong(wscale);
    } else {
        o_ws = Py_None;
        Py_INCREF(o_ws);
    }
    if (have_ts) {
        o_ts = Py_BuildValue("(kk)", (unsigned long)tsval, (unsigned long)tsecr);
    } else {
        o_ts = Py_None;
        Py_INCREF(o_ts);
    }
    if (o_mss == NULL || o_ws == NULL || o_ts == NULL) {
        Py_XDECREF(o_mss);
        Py_XDECREF(o_ws);
        Py_XDECREF(o_ts);
        return NULL;
    }
    res = PyTuple_Pack(4, o_mss, o_ws, sack ? Py_True : Py_False, o_ts);
    Py_DECREF(o_mss);
    Py_DECREF(o_ws);
    Py_DECREF(o_ts);
    return res;
}

/* ---------------------------------------------------------------------------------------- */
/* Frames out: Ethernet + IP + TCP/UDP headers in front of a payload already in place          */

/* A writable buffer and the frame's room: [start, start + need) must lie inside it. */
static int
get_out(PyObject *obj, Py_buffer *view, Py_ssize_t start, Py_ssize_t need)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (start < 0 || need < 0 || start > view->len || need > view->len - start) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "frame does not fit the buffer");
        return -1;
    }
    return 0;
}

static int
check_len(const arg_bytes *a, Py_ssize_t n, const char *what)
{
    if (a->n != n) {
        PyErr_Format(PyExc_ValueError, "%s must be %zd bytes", what, n);
        return -1;
    }
    return 0;
}

/* Ethernet + IPv4 (20 bytes, checksum) or IPv6 (40 bytes) at ``q``; returns the header length
 * written after Ethernet. ``l4_len`` was range-checked by the caller. */
static Py_ssize_t
write_eth_ip(unsigned char *q, int v6, const arg_bytes *dmac, const arg_bytes *smac,
             const arg_bytes *src, const arg_bytes *dst, unsigned proto, unsigned l4_len,
             unsigned ident, int df)
{
    memcpy(q, dmac->p, 6);
    memcpy(q + 6, smac->p, 6);
    put16(q + 12, v6 ? 0x86dd : 0x0800);
    q += 14;
    if (v6) {
        put32(q, (uint32_t)6 << 28);
        put16(q + 4, l4_len);
        q[6] = (unsigned char)proto;
        q[7] = 64;
        memcpy(q + 8, src->p, 16);
        memcpy(q + 24, dst->p, 16);
        return 40;
    }
    q[0] = 0x45;
    q[1] = 0;
    put16(q + 2, 20 + l4_len);
    put16(q + 4, ident);
    put16(q + 6, df ? 0x4000 : 0);
    q[8] = 64;
    q[9] = (unsigned char)proto;
    q[10] = q[11] = 0;
    memcpy(q + 12, src->p, 4);
    memcpy(q + 16, dst->p, 4);
    put16(q + 10, ~sum16(q, 20) & 0xffff);
    return 20;
}

/* The address arguments of a builder: MACs and IP addresses of the family's length. */
static int
get_addrs(PyObject *const *a, int v6, arg_bytes *dmac, arg_bytes *smac, arg_bytes *src,
          arg_bytes *dst)
{
    int got = 0;
    Py_ssize_t alen = v6 ? 16 : 4;
    if (get_arg(a[0], dmac) < 0)
        goto fail;
    got = 1;
    if (get_arg(a[1], smac) < 0)
        goto fail;
    got = 2;
    if (get_arg(a[2], src) < 0)
        goto fail;
    got = 3;
    if (get_arg(a[3], dst) < 0)
        goto fail;
    got = 4;
    if (check_len(dmac, 6, "a MAC") < 0 || check_len(smac, 6, "a MAC") < 0 ||
        check_len(src, alen, "an address") < 0 || check_len(dst, alen, "an address") < 0)
        goto fail;
    return 0;
fail:
    if (got > 0)
        release_arg(dmac);
    if (got > 1)
        release_arg(smac);
    if (got > 2)
        release_arg(src);
    if (got > 3)
        release_arg(dst);
    return -1;
}

static void
release_addrs(arg_bytes *dmac, arg_bytes *smac, arg_bytes *src, arg_bytes *dst)
{
    release_arg(dmac);
    release_arg(smac);
    release_arg(src);
    release_arg(dst);
}

static int
get_version(PyObject *obj, int *v6)
{
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v != 4 && v != 6) {
        PyErr_SetString(PyExc_ValueError, "version must be 4 or 6");
        return -1;
    }
    *v6 = v == 6;
    return 0;
}

/* build_tcp_frame(buf, start, version, dst_mac, src_mac, src, dst, sport, dport, seq, ack,
 *                 flags, window, ident, plen, options, partial) -> frame length */
static PyObject *
n_build_tcp_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer out;
    arg_bytes dmac, smac, src, dst, opts;
    uint64_t start, sport, dport, seq, ack, flags, window, ident, plen;
    int v6, partial;
    Py_ssize_t iplen, hlen, tcp_len, length, max_l4;
    unsigned char *q, *tcp;
    uint32_t csum;
    if (nargs != 17) {
        PyErr_SetString(PyExc_TypeError, "expected 17 arguments");
        return NULL;
    }
    if (get_u64(args[1], PY_SSIZE_T_MAX, &start) < 0 || get_version(args[2], &v6) < 0 ||
        get_u64(args[7], 0xffff, &sport) < 0 || get_u64(args[8], 0xffff, &dport) < 0 ||
        get_u64(args[9], 0xffffffffu, &seq) < 0 || get_u64(args[10], 0xffffffffu, &ack) < 0 ||
        get_u64(args[11], 0xff, &flags) < 0 || get_u64(args[12], 0xffff, &window) < 0 ||
        get_u64(args[13], 0xffff, &ident) < 0 || get_u64(args[14], 0x10000000, &plen) < 0)
        return NULL;
    partial = PyObject_IsTrue(args[16]);
    if (partial < 0)
        return NULL;
    if (get_arg(args[15], &opts) < 0)
        return NULL;
    if (opts.n > 40 || (opts.n & 3)) {
        release_arg(&opts);
        PyErr_SetString(PyExc_ValueError, "TCP options must be a multiple of 4, at most 40");
        return NULL;
    }
    if (get_addrs(args + 3, v6, &dmac, &smac, &src, &dst) < 0) {
        release_arg(&opts);
        return NULL;
    }
    iplen = v6 ? 40 : 20;
    hlen = 20 + opts.n;
    tcp_len = hlen + (Py_ssize_t)plen;
    max_l4 = v6 ? 65535 : 65535 - 20;
    if (tcp_len > max_l4) {
        PyErr_SetString(PyExc_OverflowError, "segment too long for one IP packet");
        goto fail;
    }
    length = 14 + iplen + tcp_len;
    if (get_out(args[0], &out, (Py_ssize_t)start, length < 60 ? 60 : length) < 0)
        goto fail;
    q = (unsigned char *)out.buf + start;
    write_eth_ip(q, v6, &dmac, &smac, &src, &dst, 6, (unsigned)tcp_len, (unsigned)ident, 1);
    tcp = q + 14 + iplen;
    put16(tcp, (unsigned)sport);
    put16(tcp + 2, (unsigned)dport);
    put32(tcp + 4, (uint32_t)seq);
    put32(tcp + 8, (uint32_t)ack);
    tcp[12] = (unsigned char)((hlen / 4) << 4);
    tcp[13] = (unsigned char)flags;
    put16(tcp + 14, (unsigned)window);
    tcp[16] = tcp[17] = tcp[18] = tcp[19] = 0;
    if (opts.n)
        memcpy(tcp + 20, opts.p, opts.n);
    csum = pseudo(src.p, src.n, dst.p, dst.n, 6, (uint64_t)tcp_len);
    if (!partial)
        csum = ~fold((uint64_t)sum16(tcp, tcp_len) + csum) & 0xffff;
    put16(tcp + 16, csum);
    if (length < 60) {
        memset(q + length, 0, 60 - length);
        length = 60;
    }
    PyBuffer_Release(&out);
    release_addrs(&dmac, &smac, &src, &dst);
    release_arg(&opts);
    return PyLong_FromSsize_t(length);
fail:
    release_addrs(&dmac, &smac, &src, &dst);
    release_arg(&opts);
    return NULL;
}

/* build_udp_frame(buf, start, version, dst_mac, src_mac, src, dst, sport, dport, payload_len,
 *                 ident, dont_fragment) -> frame length (counted from start) */
static PyObject *
n_build_udp_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer out;
    arg_bytes dmac, smac, src, dst;
    uint64_t start, sport, dport, plen, ident;
    int v6, df;
    Py_ssize_t iplen, l4_len, length;
    unsigned char *q, *udp;
    uint32_t csum;
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "expected 12 arguments");
        return NULL;
    }
    if (get_u64(args[1], PY_SSIZE_T_MAX, &start) < 0 || get_version(args[2], &v6) < 0 ||
        get_u64(args[7], 0xffff, &sport) < 0 || get_u64(args[8], 0xffff, &dport) < 0 ||
        get_u64(args[9], 0xffff - 8, &plen) < 0 || get_u64(args[10], 0xffff, &ident) < 0)
        return NULL;
    df = PyObject_IsTrue(args[11]);
    if (df < 0)
        return NULL;
    iplen = v6 ? 40 : 20;
    l4_len = 8 + (Py_ssize_t)plen;
    if (!v6 && l4_len > 65535 - 20) {
        PyErr_SetString(PyExc_OverflowError, "datagram too long for one IP packet");
        return NULL;
    }
    if (get_addrs(args + 3, v6, &dmac, &smac, &src, &dst) < 0)
        return NULL;
    length = 14 + iplen + l4_len;
    if (get_out(args[0], &out, (Py_ssize_t)start, length) < 0) {
        release_addrs(&dmac, &smac, &src, &dst);
        return NULL;
    }
    q = (unsigned char *)out.buf + start;
    write_eth_ip(q, v6, &dmac, &smac, &src, &dst, 17, (unsigned)l4_len, (unsigned)ident, df);
    udp = q + 14 + iplen;
    put16(udp, (unsigned)sport);
    put16(udp + 2, (unsigned)dport);
    put16(udp + 4, (unsigned)l4_len);
    udp[6] = udp[7] = 0;
    csum = pseudo(src.p, src.n, dst.p, dst.n, 17, (uint64_t)l4_len);
    csum = ~fold((uint64_t)sum16(udp, l4_len) + csum) & 0xffff;
    put16(udp + 6, csum ? csum : 0xffff);
    PyBuffer_Release(&out);
    release_addrs(&dmac, &smac, &src, &dst);
    return PyLong_FromSsize_t(length);
}

/* ---------------------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"ones_sum", (PyCFunction)(void (*)(void))n_ones_sum, METH_FASTCALL,
     "ones_sum(data, initial=0): 16-bit ones'-complement sum, not complemented."},
    {"checksum", (PyCFunction)(void (*)(void))n_checksum, METH_FASTCALL,
     "checksum(data, initial=0): the Internet checksum."},
    {"pseudo_sum", (PyCFunction)(void (*)(void))n_pseudo_sum, METH_FASTCALL,
     "pseudo_sum(src, dst, proto, length): the TCP/UDP pseudo-header sum."},
    {"tcp_fast4", (PyCFunction)(void (*)(void))n_tcp_fast4, METH_FASTCALL,
     "tcp_fast4(frame, our_mac, guest_mac, broadcast, dns_dsts, verify): fields or None."},
    {"tcp_fast6", (PyCFunction)(void (*)(void))n_tcp_fast6, METH_FASTCALL,
     "tcp_fast6(frame, our_mac, guest_mac, dns6_dsts, verify): fields or None."},
    {"udp_fast4", (PyCFunction)(void (*)(void))n_udp_fast4, METH_FASTCALL,
     "udp_fast4(frame, our_mac, guest_mac, broadcast, verify): fields or None."},
    {"udp_fast6", (PyCFunction)(void (*)(void))n_udp_fast6, METH_FASTCALL,
     "udp_fast6(frame, our_mac, guest_mac, verify): fields or None."},
    {"fast_parse", (PyCFunction)(void (*)(void))n_fast_parse, METH_FASTCALL,
     "fast_parse(frame, our_mac, guest_mac, broadcast, dns_dsts, dns6_dsts, verify): "
     "(kind, *fields) or None."},
    {"dns_question", (PyCFunction)(void (*)(void))n_dns_question, METH_FASTCALL,
     "dns_question(data): (ident, question, name_len) of a plain query, or None."},
    {"parse_ipv4", (PyCFunction)(void (*)(void))n_parse_ipv4, METH_FASTCALL,
     "parse_ipv4(data, verify): the IPv4 header's fields, or WireError."},
    {"tcp_options", (PyCFunction)(void (*)(void))n_tcp_options, METH_FASTCALL,
     "tcp_options(data, header_len): (mss, wscale, sack_permitted, timestamp)."},
    {"build_tcp_frame", (PyCFunction)(void (*)(void))n_build_tcp_frame, METH_FASTCALL,
     "build_tcp_frame(...): Ethernet, IP and TCP headers; returns the frame length."},
    {"build_udp_frame", (PyCFunction)(void (*)(void))n_build_udp_frame, METH_FASTCALL,
     "build_udp_frame(...): Ethernet, IP and UDP headers; returns the frame length."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "guestnet.wire._native",
    "The per-frame leaf operations in C (see guestnet.wire.native).", -1, methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    PyObject *wire = PyImport_ImportModule("guestnet.wire");
    if (wire == NULL)
        return NULL;
    WireError = PyObject_GetAttrString(wire, "WireError");
    Py_DECREF(wire);
    if (WireError == NULL)
        return NULL;
    return PyModule_Create(&module);
}
