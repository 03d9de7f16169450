/*
 * pktipc shared-memory layout, version 2: declarations only. Version 2 is
 * the segment with its frame area (AF_XDP's UMEM, past the slabs) and the
 * NO_HASH flag, and a sending client's TX area (its own object, with a
 * version of its own, PKTIPC_TX_LAYOUT_VERSION).
 *
 * This file is the single source of the layout. cffi's cdef() reads it as it
 * is, so it holds nothing but integer #defines and struct declarations: no
 * include guard, no #include, no expressions. C programs include
 * <pktipc_shm.h>, which wraps this file and pins every size and offset with
 * _Static_assert. shm/LAYOUT.md describes every byte.
 *
 * Do not change the layout of these structures; introduce new ones and a new
 * PKTIPC_LAYOUT_VERSION.
 *
 * Who writes what: (b) the broker, once, before the segment is announced;
 * (B) the broker, while running; nobody else writes anything. Clients map
 * the segment read-only. A client's TX area (at the end of this file) is
 * the other way round: (c) that client alone writes it; the broker maps it
 * read-only.
 */

#define PKTIPC_MAGIC            0x100435049544b50   /* "PKTIPC\0\1" little-endian */
#define PKTIPC_LAYOUT_VERSION   2
#define PKTIPC_HEADER_SIZE      4096
#define PKTIPC_DESC_SIZE        32
#define PKTIPC_BATCH_REC_SIZE   64
#define PKTIPC_IFACE_SIZE       128
#define PKTIPC_MAX_IFACES       4096   /* sources per broker */
#define PKTIPC_IFNAME_LEN       48
#define PKTIPC_NAME_LEN         64
#define PKTIPC_SLAB_ALIGN       4096
#define PKTIPC_MAX_SLAB_SIZE    1073741824   /* 1 GiB */
#define PKTIPC_MIN_SLABS        2
#define PKTIPC_MAX_SLABS        65535
#define PKTIPC_FRAME_ALIGN      8
#define PKTIPC_MIN_FRAME_SIZE   2048         /* frame area: a power of two from this */
#define PKTIPC_MAX_FRAME_SIZE   4096         /* ... to this */

/* pktipc_header.state */
#define PKTIPC_STATE_STARTING   0
#define PKTIPC_STATE_RUNNING    1
#define PKTIPC_STATE_ENDED      2   /* sources exhausted, end-of-stream sent */

/* pktipc_iface.kind */
#define PKTIPC_IFACE_FILE       1
#define PKTIPC_IFACE_LIVE       2

/* pktipc_pkt.flags */
#define PKTIPC_F_VLAN_VALID      0x0001  /* vlan_tci holds the frame's outer tag */
#define PKTIPC_F_VLAN_REINSERTED 0x0002  /* ... and the bytes hold it (put back, or kept) */
#define PKTIPC_F_QINQ            0x0004  /* that tag is an 802.1ad (outer) tag */
#define PKTIPC_F_TRUNCATED       0x0008  /* caplen < wirelen */
#define PKTIPC_F_TS_HW           0x0010  /* ts_ns comes from the NIC's clock */
#define PKTIPC_F_DIR_SHIFT       5       /* bits 5-7: PKTIPC_DIR_* */
#define PKTIPC_F_DIR_MASK        0x00e0
#define PKTIPC_F_NO_HASH         0x0100  /* hash was not computed (it is 0): see LAYOUT.md */

/* direction, (flags & PKTIPC_F_DIR_MASK) >> PKTIPC_F_DIR_SHIFT; the kernel's
 * PACKET_* packet type plus one, so that 0 means "not known" (files). */
#define PKTIPC_DIR_UNKNOWN      0
#define PKTIPC_DIR_HOST         1
#define PKTIPC_DIR_BROADCAST    2
#define PKTIPC_DIR_MULTICAST    3
#define PKTIPC_DIR_OTHERHOST    4
#define PKTIPC_DIR_OUTGOING     5

/* One packet. Two per cache line. The frame's bytes are at data_off from the
 * start of the slab that holds this descriptor: in that slab, or in the
 * frame area past every slab. A packet's sequence number is its batch's seq
 * plus its index in the slab. */
struct pktipc_pkt {
    int64_t  ts_ns;        /*  0 (B) capture time, ns since the Unix epoch (signed) */
    uint32_t data_off;     /*  8 (B) first byte of the frame, from slab start */
    uint32_t caplen;       /* 12 (B) bytes present */
    uint32_t wirelen;      /* 16 (B) bytes on the wire */
    uint32_t hash;         /* 20 (B) symmetric flow hash, 0: none (or NO_HASH) */
    uint16_t iface;        /* 24 (B) index into pktipc_header.ifaces */
    uint16_t linktype;     /* 26 (B) LINKTYPE_* of the frame (1: Ethernet) */
    uint16_t vlan_tci;     /* 28 (B) outer VLAN tag, if VLAN_VALID */
    uint16_t flags;        /* 30 (B) PKTIPC_F_* */
};

/* Broker-wide counters, monotonic (never reset) except `clients`. */
struct pktipc_counters {
    uint64_t packets;          /*  0 (B) packets placed in slabs */
    uint64_t bytes;            /*  8 (B) captured bytes placed in slabs */
    uint64_t batches;          /* 16 (B) batches published */
    uint64_t broker_drops;     /* 24 (B) packets the broker could not place */
    uint64_t client_drops;     /* 32 (B) packet deliveries skipped for lagging clients */
    uint64_t protocol_errors;  /* 40 (B) malformed or refused control messages */
    uint64_t clients;          /* 48 (B) clients attached now (a gauge) */
    uint64_t clients_total;    /* 56 (B) clients ever attached */
};

/* One packet source: an interface or a capture file. */
struct pktipc_iface {
    char     name[48];         /*   0 (b) interface name or file name, NUL-terminated */
    uint32_t ifindex;          /*  48 (b) 0 for files */
    uint32_t linktype;         /*  52 (b) LINKTYPE_* */
    uint32_t snaplen;          /*  56 (b) */
    uint32_t ts_resolution;    /*  60 (b) source clock ticks per second (ts_ns is always ns) */
    uint64_t packets;          /*  64 (B) packets from this source placed in slabs */
    uint64_t bytes;            /*  72 (B) */
    uint64_t kernel_packets;   /*  80 (B) live: packets the kernel saw */
    uint64_t kernel_drops;     /*  88 (B) live: packets the kernel dropped */
    uint64_t kernel_freezes;   /*  96 (B) live: times the kernel ring froze */
    uint32_t kind;             /* 104 (b) PKTIPC_IFACE_* */
    uint32_t reserved0;        /* 108 */
    uint64_t reserved1[2];     /* 112 */
};

struct pktipc_header {
    uint64_t magic;            /*    0 (b) PKTIPC_MAGIC, written last */
    uint32_t layout_version;   /*    8 (b) PKTIPC_LAYOUT_VERSION */
    uint32_t header_size;      /*   12 (b) PKTIPC_HEADER_SIZE */
    uint64_t epoch;            /*   16 (b) new at every broker start */
    uint64_t start_time_ns;    /*   24 (b) CLOCK_REALTIME at start */
    uint32_t broker_pid;       /*   32 (b) */
    uint32_t state;            /*   36 (B) PKTIPC_STATE_* */
    uint32_t slab_size;        /*   40 (b) bytes, a multiple of PKTIPC_SLAB_ALIGN */
    uint32_t slab_count;       /*   44 (b) */
    uint32_t desc_size;        /*   48 (b) PKTIPC_DESC_SIZE */
    uint32_t batch_rec_size;   /*   52 (b) PKTIPC_BATCH_REC_SIZE */
    uint32_t iface_count;      /*   56 (b) entries in the interface table */
    uint32_t iface_size;       /*   60 (b) PKTIPC_IFACE_SIZE */
    uint64_t iface_table_off;  /*   64 (b) from segment start */
    uint64_t batch_table_off;  /*   72 (b) from segment start */
    uint64_t slabs_off;        /*   80 (b) from segment start */
    uint64_t total_size;       /*   88 (b) segment size */
    uint64_t frames_off;       /*   96 (b) frame area, from segment start: past the slabs */
    uint32_t frame_size;       /*  104 (b) bytes per frame of the frame area; 0: no area */
    uint32_t frame_count;      /*  108 (b) frames in the frame area */
    uint8_t  reserved0[16];    /*  112 */
    char     name[64];         /*  128 (b) broker name, NUL-terminated */
    struct pktipc_counters counters;             /*  192 (B) */
    uint8_t  reserved1[3840];  /*  256 */
};

/* Not in the segment: where its regions start, from the slab size, the
 * slab count, the number of sources and the frame area's frames
 * (pktipc_geometry in pktipc_shm.h). */
struct pktipc_geometry {
    uint64_t iface_table_off;
    uint64_t batch_table_off;
    uint64_t slabs_off;
    uint64_t frames_off;
    uint64_t total_size;
};

/* One record per slab, indexed by slab number. The record describes the
 * batch the slab holds now; seq is written last. */
struct pktipc_batch_rec {
    uint64_t seq;              /*  0 (B) seq of the batch's first packet; written last */
    uint32_t slab;             /*  8 (B) this record's slab index */
    uint32_t gen;              /* 12 (B) times this slab was published */
    uint32_t count;            /* 16 (B) descriptors in the slab */
    uint32_t data_bytes;       /* 20 (B) bytes of frame data in the slab */
    int64_t  first_ts_ns;      /* 24 (B) */
    int64_t  last_ts_ns;       /* 32 (B) */
    uint64_t kernel_drops;     /* 40 (B) kernel drops since the previous batch */
    uint64_t broker_drops;     /* 48 (B) broker drops since the previous batch */
    uint32_t flags;            /* 56 (B) reserved, 0 */
    uint32_t reserved;         /* 60 */
};

/*
 * A sending client's TX area, layout version 1: a POSIX shared-memory
 * object the client makes, writes and names in TX_OPEN; the broker maps it
 * read-only, copies its header once and checks the copy, and reads each
 * descriptor once, before it copies the frame into the kernel's TX ring.
 * (c) the client, once, before TX_OPEN; (C) the client, while running: a
 * slot's descriptor and bytes before a TX message names the slot, and not
 * again until TX_DONE gives it back.
 *
 *   0            header (64 bytes, in a page of its own)
 *   desc_off     frame_count descriptors of 16 bytes (4096-byte aligned)
 *   frames_off   frame_count slots of frame_size bytes (4096-byte aligned)
 *   total_size
 */
#define PKTIPC_TX_MAGIC          0x0154435049544b50   /* "PKTIPCT\1" little-endian */
#define PKTIPC_TX_LAYOUT_VERSION 1
#define PKTIPC_TX_HEADER_SIZE    64
#define PKTIPC_TX_DESC_SIZE      16
#define PKTIPC_TX_MAX_FRAMES     65536    /* slots: a power of two, at most this */
#define PKTIPC_TX_FRAME_ALIGN    64       /* a slot's size is a multiple of this ... */
#define PKTIPC_TX_MAX_FRAME_SIZE 65536    /* ... and at most this */

struct pktipc_tx_header {
    uint64_t magic;            /*  0 (c) PKTIPC_TX_MAGIC, written last */
    uint32_t layout_version;   /*  8 (c) PKTIPC_TX_LAYOUT_VERSION */
    uint32_t header_size;      /* 12 (c) PKTIPC_TX_HEADER_SIZE */
    uint32_t frame_count;      /* 16 (c) slots */
    uint32_t frame_size;       /* 20 (c) bytes per slot: the longest frame it holds */
    uint32_t desc_size;        /* 24 (c) PKTIPC_TX_DESC_SIZE */
    uint32_t reserved0;        /* 28 */
    uint64_t desc_off;         /* 32 (c) from the area's start */
    uint64_t frames_off;       /* 40 (c) from the area's start */
    uint64_t total_size;       /* 48 (c) bytes in the area */
    uint64_t reserved1;        /* 56 */
};

/* One frame to send: slot i's bytes are at frames_off + i * frame_size. */
struct pktipc_tx_desc {
    uint32_t len;              /*  0 (C) bytes of the frame */
    uint16_t iface;            /*  4 (C) index into the broker's interface table */
    uint16_t flags;            /*  6 (C) 0 */
    uint64_t reserved;         /*  8 (C) 0 */
};

/* Not in the area: where its regions start (pktipc_tx_geometry). */
struct pktipc_tx_geometry {
    uint64_t desc_off;
    uint64_t frames_off;
    uint64_t total_size;
};
