/*
 * libFuzzer target: a group member's share of a batch, pktipc_select and
 * pktipc_share_counts (shm/pktipc_shm.h). Input: the number of members
 * (first byte, 0..8), which of them asks (second), whether a mask is given
 * (third), the members' slots (u32 each, distinct as the protocol requires),
 * then the packets' flow hashes (u32 each) and, with a mask, its bytes;
 * every array in a heap block of exactly its size. Checked:
 *   - a share lists, in order, packets of the batch that the mask lets
 *     through and that the asking member owns; no mask is a mask of ones;
 *   - the members' shares split the masked packets: each in exactly one, as
 *     pktipc_share_counts counts them; a slot not among the members gets none;
 *   - the members' order changes nothing, and a member leaving gives its
 *     packets to the others and takes nobody else's.
 */
#include <stdint.h>
#include <string.h>

#include "pktipc_shm.h"
#include "harness.h"

#define MAX_MEMBERS 8

static uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static void *exact(size_t n)
{
    void *p = malloc(n);
    CHECK(p || !n, "out of memory");
    return p;
}

static int masked(const uint8_t *mask, uint32_t i)
{
    return !mask || (mask[i >> 3] >> (i & 7) & 1);
}

/* The members' shares, with `me`'s share out[0..k) among them. */
static void check_division(const struct pktipc_pkt *pkts, uint32_t count, const uint8_t *mask,
                           const uint32_t *members, uint32_t n, uint32_t asking,
                           const uint32_t *out, uint32_t k, uint32_t total)
{
    const uint32_t me = members[asking];
    uint32_t *other = exact(count * sizeof(uint32_t));
    uint8_t *owner = exact(count);
    memset(owner, 0xff, count);
    uint32_t counts[MAX_MEMBERS] = {0}, sum = 0;
    pktipc_share_counts(pkts, count, mask, members, n, counts);
    for (uint32_t m = 0; m < n; m++) {
        uint32_t km = pktipc_select(pkts, count, mask, members, n, members[m], other);
        CHECK(km == counts[m], "member %u: %u selected, %u counted", m, km, counts[m]);
        for (uint32_t j = 0; j < km; j++) {
            CHECK(owner[other[j]] == 0xff, "packet %u in two shares", other[j]);
            owner[other[j]] = (uint8_t)m;
        }
        sum += km;
    }
    CHECK(sum == total, "shares of %u packets, %u masked", sum, total);

    uint32_t stranger = me;
    for (int again = 1; again;) {
        stranger++;
        again = 0;
        for (uint32_t m = 0; m < n; m++)
            again |= members[m] == stranger;
    }
    CHECK(pktipc_select(pkts, count, mask, members, n, stranger, other) == 0,
          "a slot not among the members gets packets");

    uint32_t reversed[MAX_MEMBERS];
    for (uint32_t m = 0; m < n; m++)
        reversed[m] = members[n - 1 - m];
    CHECK(pktipc_select(pkts, count, mask, reversed, n, me, other) == k &&
          (!k || memcmp(out, other, k * sizeof(uint32_t)) == 0), "the members' order matters");

    if (n >= 2) {
        /* The member after the asking one leaves. */
        const uint32_t gone = (asking + 1) % n;
        uint32_t left[MAX_MEMBERS], nl = 0;
        for (uint32_t m = 0; m < n; m++)
            if (m != gone)
                left[nl++] = members[m];
        uint32_t kl = pktipc_select(pkts, count, mask, left, nl, me, other);
        uint32_t j = 0;
        for (uint32_t i = 0; i < kl; i++) {
            if (j < k && out[j] == other[i])
                j++;
            else
                CHECK(owner[other[i]] == gone, "packet %u moved from member %u, not the one "
                      "that left", other[i], owner[other[i]]);
        }
        CHECK(j == k, "a member leaving took %u of another's packets", k - j);
    }
    free(owner);
    free(other);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 3 || size > (1 << 20))
        return 0;
    const uint32_t n = data[0] % (MAX_MEMBERS + 1);
    const int with_mask = data[2] & 1;
    size_t off = 3;
    if (size - off < 4 * (size_t)n)
        return 0;
    uint32_t *members = exact(n * sizeof(uint32_t));
    for (uint32_t i = 0; i < n; i++, off += 4) {
        members[i] = rd32(data + off);
        for (uint32_t j = 0; j < i; j++)
            if (members[j] == members[i]) {
                free(members);
                return 0;
            }
    }
    size_t rest = size - off;
    uint32_t count = (uint32_t)(with_mask ? rest * 8 / 33 : rest / 4);
    while (4 * (size_t)count + (with_mask ? (count + 7) / 8 : 0) > rest)
        count--;
    struct pktipc_pkt *pkts = exact(count * sizeof(*pkts));
    memset(pkts, 0, count * sizeof(*pkts));
    for (uint32_t i = 0; i < count; i++, off += 4)
        pkts[i].hash = rd32(data + off);
    uint8_t *mask = NULL;
    if (with_mask) {
        mask = exact((count + 7) / 8);
        memcpy(mask, data + off, (count + 7) / 8);
    }
    const uint32_t me = n ? members[data[1] % n] : data[1];
    uint32_t *out = exact(count * sizeof(uint32_t)), *other = exact(count * sizeof(uint32_t));
    uint32_t total = 0;
    for (uint32_t i = 0; i < count; i++)
        total += masked(mask, i);

    const uint32_t k = pktipc_select(pkts, count, mask, members, n, me, out);
    CHECK(k <= count, "%u of %u", k, count);
    for (uint32_t j = 0; j < k; j++) {
        CHECK(out[j] < count && (j == 0 || out[j] > out[j - 1]), "share out of order");
        CHECK(masked(mask, out[j]), "packet %u is not in the mask", out[j]);
        CHECK(!n || members[pktipc_flow_owner(pkts[out[j]].hash, members, n)] == me,
              "packet %u is not ours", out[j]);
    }
    if (!mask) {
        uint8_t *ones = exact((count + 7) / 8);
        memset(ones, 0xff, (count + 7) / 8);
        CHECK(pktipc_select(pkts, count, ones, members, n, me, other) == k &&
              (!k || memcmp(out, other, k * sizeof(uint32_t)) == 0), "a mask of ones differs");
        free(ones);
    }
    if (n)
        check_division(pkts, count, mask, members, n, data[1] % n, out, k, total);
    else
        CHECK(k == total, "undivided: %u of %u", k, total);
    free(members);
    free(pkts);
    free(mask);
    free(out);
    free(other);
    return 0;
}
