/* Assertions for the C tests: a failed one names itself and ends the run. */
#ifndef PKTIPC_CHECK_H
#define PKTIPC_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: failed: %s\n", __FILE__, __LINE__, #cond);         \
            exit(1);                                                                   \
        }                                                                              \
    } while (0)

#define CHECK_EQ(a, b)                                                                 \
    do {                                                                               \
        long long a_ = (long long)(a), b_ = (long long)(b);                            \
        if (a_ != b_) {                                                                \
            fprintf(stderr, "%s:%d: failed: %s == %s (%lld != %lld)\n", __FILE__,      \
                    __LINE__, #a, #b, a_, b_);                                         \
            exit(1);                                                                   \
        }                                                                              \
    } while (0)

/* Runs a test, unless argv names others: test-x [NAME-SUBSTRING...]. */
#define RUN(test)                                                                      \
    do {                                                                               \
        int run_ = argc < 2;                                                           \
        for (int i_ = 1; i_ < argc; i_++)                                              \
            run_ |= strstr(#test, argv[i_]) != NULL;                                   \
        if (run_) {                                                                    \
            fprintf(stderr, "%-46s", #test);                                           \
            test();                                                                    \
            fprintf(stderr, " ok\n");                                                  \
        }                                                                              \
    } while (0)

#endif
