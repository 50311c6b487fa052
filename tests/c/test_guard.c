/* test_guard.c - page guards: the region table, a write fault becomes a
 * recorded private page while the shared bytes stay unchanged, restore brings
 * back pristine data, foreign faults reach the previous handler, and many
 * scattered pages do not exhaust mappings. */
#define _GNU_SOURCE
#include "harness.h"
#include "guard.h"
#include "seg.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t notified;
static volatile sig_atomic_t notified_sig;

static void count_notify(int signum)
{
    notified++;
    notified_sig = signum;
}

/* A sealed memfd of `size` bytes whose byte i is (i * 7 + 3) & 0xff, mapped
 * twice: MAP_PRIVATE read-only (*priv, what workers use) and MAP_SHARED
 * read-only (*shared, to check the segment itself never changes). */
static int make_input(uint64_t size, unsigned char **priv, unsigned char **shared)
{
    int fd;
    void *w, *p, *s;
    uint64_t i;

    CHECK_RC(shardc_seg_create(SHARDC_BACKING_MEMFD, "guard-test", size, 0, &fd));
    CHECK_RC(shardc_seg_map(fd, 0, size, SHARDC_MAP_WRITE, &w));
    for (i = 0; i < size; i++)
        ((unsigned char *)w)[i] = (unsigned char)((i * 7 + 3) & 0xff);
    CHECK_RC(shardc_seg_unmap(w, size));
    CHECK_RC(shardc_seg_seal(fd));
    CHECK_RC(shardc_seg_map(fd, 0, size, SHARDC_MAP_PRIVATE, &p));
    CHECK_RC(shardc_seg_map(fd, 0, size, 0, &s));
    *priv = p;
    *shared = s;
    return fd;
}

/* A store the compiler may not move past the checks that follow it. */
static void poke(unsigned char *p, uint64_t off, unsigned char v)
{
    ((volatile unsigned char *)p)[off] = v;
}

static int pristine(const unsigned char *a, uint64_t size)
{
    uint64_t i;
    for (i = 0; i < size; i++)
        if (a[i] != (unsigned char)((i * 7 + 3) & 0xff))
            return 0;
    return 1;
}

static int count_maps(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    int c, n = 0;
    if (f == NULL)
        return -1;
    while ((c = fgetc(f)) != EOF)
        n += c == '\n';
    fclose(f);
    return n;
}

/* add/lookup/dirty/remove bookkeeping and argument checks. */
static void test_region_table(void)
{
    uint64_t ps = shardc_page_size();
    void *m = mmap(NULL, 300 * ps, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int id, id2, ids[4], i, all[SHARDC_GUARD_MAX_REGIONS];
    char *base = m;

    CHECK(m != MAP_FAILED);
    CHECK(shardc_guard_add(base + 1, ps, SHARDC_GUARD_DENY, &id) == -EINVAL);
    CHECK(shardc_guard_add(base, 0, SHARDC_GUARD_DENY, &id) == -EINVAL);
    CHECK(shardc_guard_add(base, ps, 7, &id) == -EINVAL);
    CHECK_RC(shardc_guard_add(base, 2 * ps + 1, SHARDC_GUARD_AUDIT, &id));
    CHECK(shardc_guard_add(base + 2 * ps, ps, SHARDC_GUARD_DENY, &id2) == -EEXIST);
    CHECK_RC(shardc_guard_add(base + 3 * ps, ps, SHARDC_GUARD_ALLOW, &id2));
    CHECK(id != id2);
    CHECK(shardc_guard_lookup(base + ps, 10, ids, 4) == 1 && ids[0] == id);
    CHECK(shardc_guard_lookup(base + 2 * ps, 2 * ps, ids, 4) == 2);
    CHECK(shardc_guard_lookup(base + 10 * ps, ps, ids, 4) == 0);
    CHECK(shardc_guard_dirty(ids, 4) == 0);
    CHECK_RC(shardc_guard_remove(id));
    CHECK(shardc_guard_remove(id) == -EINVAL);
    CHECK_RC(shardc_guard_remove(id2));
    /* The table is fixed-size: the 257th region is refused. */
    for (i = 0; i < SHARDC_GUARD_MAX_REGIONS; i++)
        CHECK_RC(shardc_guard_add(base + (uint64_t)i * ps, ps, SHARDC_GUARD_DENY, &all[i]));
    CHECK(shardc_guard_add(base + 299 * ps, ps, SHARDC_GUARD_DENY, &id) == -ENOSPC);
    for (i = 0; i < SHARDC_GUARD_MAX_REGIONS; i++)
        CHECK_RC(shardc_guard_remove(all[i]));
    CHECK(shardc_guard_install(NULL, SIGSEGV, 0) == -EINVAL);
    CHECK(shardc_guard_set_limits(5000, 10) == -EINVAL);
    munmap(m, 300 * ps);
}

/* A store into a deny region lands in a private page, is recorded with its
 * offset and notified; the segment is unchanged; restore brings back the
 * segment's bytes and arms the page again. */
static void test_fault_records_and_restores(void)
{
    uint64_t ps = shardc_page_size(), size = 4 * ps;
    unsigned char *p, *s;
    int fd = make_input(size, &p, &s), id, ids[4];
    shardc_guard_info_t info;
    shardc_guard_counters_t c0, c1;

    CHECK_RC(shardc_guard_install(count_notify, SIGUSR2, SHARDC_GUARD_NOTIFY_CALL));
    CHECK_RC(shardc_guard_add(p, size, SHARDC_GUARD_DENY, &id));
    CHECK_RC(shardc_guard_counters(&c0));
    notified = 0;
    CHECK(p[ps + 100] == (unsigned char)(((ps + 100) * 7 + 3) & 0xff)); /* reads do not fault */
    CHECK(notified == 0);
    poke(p, ps + 100, 0xEE);
    poke(p, ps + 101, 0xEF); /* same page: no new fault */
    CHECK(notified == 1 && notified_sig == SIGUSR2);
    CHECK(shardc_guard_take_notify() == 1);
    CHECK(shardc_guard_take_notify() == 0);
    CHECK(p[ps + 100] == 0xEE);
    CHECK(pristine(s, size)); /* the segment never saw the store */
    CHECK(shardc_guard_dirty(ids, 4) == 1 && ids[0] == id);
    CHECK_RC(shardc_guard_collect(id, &info));
    CHECK(info.written == 1 && info.pages == 1 && info.first_offset == ps + 100);
    CHECK(info.faults == 1 && info.exact == 1 && info.overflow == 0);
    CHECK(info.mode == SHARDC_GUARD_DENY);
    CHECK_RC(shardc_guard_counters(&c1));
    CHECK(c1.faults == c0.faults + 1 && c1.notified == c0.notified + 1 && c1.tracked == 1);
    CHECK_RC(shardc_guard_restore(id));
    CHECK(pristine(p, size));
    CHECK(shardc_guard_dirty(ids, 4) == 0);
    CHECK_RC(shardc_guard_collect(id, &info));
    CHECK(info.written == 0 && info.pages == 0);
    CHECK_RC(shardc_guard_counters(&c1));
    CHECK(c1.tracked == 0);
    /* The page is write-protected again: the next store faults again, and
     * two adjacent pages are restored as one run. */
    memset(p + ps - 8, 0x11, 16);
    CHECK(notified == 3); /* one fault per page */
    CHECK_RC(shardc_guard_collect(id, &info));
    CHECK(info.pages == 2 && info.first_offset == ps - 8 && info.faults == 2);
    CHECK(pristine(s, size));
    CHECK_RC(shardc_guard_restore(id));
    CHECK(pristine(p, size));
    CHECK_RC(shardc_guard_remove(id));
    shardc_seg_unmap(p, size);
    shardc_seg_unmap(s, size);
    close(fd);
}

static volatile sig_atomic_t usr2_seen;
static void on_usr2(int sig)
{
    (void)sig;
    usr2_seen++;
}

/* audit/allow regions record without notifying; the raise() notifier sends
 * a real signal for deny regions. */
static void test_modes_and_raise_notify(void)
{
    uint64_t ps = shardc_page_size(), size = 2 * ps;
    unsigned char *p, *s;
    int fd = make_input(size, &p, &s), id;
    shardc_guard_info_t info;
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_usr2;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGUSR2, &sa, NULL) == 0);
    CHECK(shardc_guard_install(count_notify, SIGUSR2, SHARDC_GUARD_NOTIFY_RAISE) == -EINVAL);
    CHECK_RC(shardc_guard_install(NULL, SIGUSR2, SHARDC_GUARD_NOTIFY_RAISE));
    CHECK_RC(shardc_guard_add(p, size, SHARDC_GUARD_AUDIT, &id));
    usr2_seen = 0;
    (void)shardc_guard_take_notify(); /* left over from the previous test */
    poke(p, 3, 1);
    CHECK(usr2_seen == 0 && shardc_guard_take_notify() == 0);
    CHECK_RC(shardc_guard_collect(id, &info));
    CHECK(info.written && info.pages == 1 && info.mode == SHARDC_GUARD_AUDIT);
    CHECK_RC(shardc_guard_remove(id)); /* remove restores first */
    CHECK(pristine(p, size));
    CHECK_RC(shardc_guard_add(p, size, SHARDC_GUARD_DENY, &id));
    poke(p, ps, 1);
    CHECK(usr2_seen == 1 && shardc_guard_take_notify() == 1);
    CHECK(pristine(s, size));
    CHECK_RC(shardc_guard_remove(id));
    CHECK(pristine(p, size));
    signal(SIGUSR2, SIG_DFL);
    shardc_seg_unmap(p, size);
    shardc_seg_unmap(s, size);
    close(fd);
}

static void prev_siginfo(int sig, siginfo_t *info, void *ctx)
{
    (void)sig;
    (void)info;
    (void)ctx;
    _exit(42);
}

static void prev_plain(int sig)
{
    (void)sig;
    _exit(43);
}

/* Run a child that installs `prev` (NULL: leave SIG_DFL), then the guard,
 * then faults outside any region (or kills itself if use_kill); return its
 * wait status. */
static int chained_child(void (*prev)(int, siginfo_t *, void *), void (*plain)(int),
                         int use_kill)
{
    pid_t pid = fork();
    int status;

    CHECK(pid >= 0);
    if (pid == 0) {
        uint64_t ps = shardc_page_size();
        struct sigaction sa;
        char *ro = mmap(NULL, 2 * ps, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        int id;

        memset(&sa, 0, sizeof(sa));
        sigemptyset(&sa.sa_mask);
        if (prev != NULL) {
            sa.sa_sigaction = prev;
            sa.sa_flags = SA_SIGINFO;
            sigaction(SIGSEGV, &sa, NULL);
        } else if (plain != NULL) {
            sa.sa_handler = plain;
            sigaction(SIGSEGV, &sa, NULL);
        } else {
            signal(SIGSEGV, SIG_DFL);
        }
        if (shardc_guard_uninstall() < 0 || shardc_guard_install(NULL, SIGUSR2, 0) < 0)
            _exit(2);
        /* A registered region next door must not capture the fault. */
        if (shardc_guard_add(ro, ps, SHARDC_GUARD_AUDIT, &id) < 0)
            _exit(3);
        if (use_kill)
            kill(getpid(), SIGSEGV);
        else
            ((volatile char *)ro)[ps + 1] = 1;
        _exit(0);
    }
    CHECK(waitpid(pid, &status, 0) == pid);
    return status;
}

/* Faults outside every region reach the previous handler: sa_sigaction,
 * sa_handler, or the default action (killed by SIGSEGV, also for kill()). */
static void test_chaining(void)
{
    int st;

    st = chained_child(prev_siginfo, NULL, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 42);
    st = chained_child(NULL, prev_plain, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 43);
    st = chained_child(NULL, NULL, 0);
    CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV);
    st = chained_child(NULL, NULL, 1);
    CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV);
}

/* Thousands of scattered pages in one shard: the region goes whole-writable
 * past the per-region limit (no VMA explosion), pagemap gives the exact
 * count, and restore makes everything pristine and read-only again. */
static void test_many_scattered_pages(void)
{
    uint64_t ps = shardc_page_size(), npages = 16384, size = npages * ps, i;
    unsigned char *p, *s;
    int fd = make_input(size, &p, &s), id, maps0, maps1;
    shardc_guard_info_t info;
    shardc_guard_counters_t c;

    CHECK_RC(shardc_guard_install(count_notify, SIGUSR2, 0));
    CHECK_RC(shardc_guard_add(p, size, SHARDC_GUARD_ALLOW, &id));
    maps0 = count_maps();
    for (i = 0; i < npages; i += 2)
        poke(p, i * ps + 5, 0xAA);
    maps1 = count_maps();
    CHECK(maps1 - maps0 < 1100); /* at most ~2 VMAs per tracked page */
    CHECK_RC(shardc_guard_collect(id, &info));
    CHECK(info.overflow == 1 && info.exact == 1 && info.pages == npages / 2);
    CHECK(info.first_offset == 5);
    CHECK(pristine(s, size));
    CHECK_RC(shardc_guard_restore(id));
    CHECK(pristine(p, size));
    CHECK(count_maps() <= maps0 + 8); /* merged back (slack: the allocator's own maps) */
    CHECK_RC(shardc_guard_counters(&c));
    CHECK(c.tracked == 0 && c.overflows >= 1);
    /* Under the per-region limit, every page is tracked one by one. */
    CHECK_RC(shardc_guard_set_limits(64, 8192));
    for (i = 0; i < 40; i++)
        poke(p, i * 3 * ps, 1);
    CHECK_RC(shardc_guard_collect(id, &info));
    CHECK(info.overflow == 0 && info.pages == 40);
    CHECK(count_maps() >= maps0 + 40); /* split while written */
    CHECK_RC(shardc_guard_restore(id));
    CHECK(count_maps() <= maps0 + 8);  /* and merged back after restore */
    /* The global limit also forces overflow. */
    CHECK_RC(shardc_guard_set_limits(64, 10));
    for (i = 0; i < 40; i++)
        poke(p, i * 3 * ps, 1);
    CHECK_RC(shardc_guard_collect(id, &info));
    CHECK(info.overflow == 1 && info.pages == 40);
    CHECK_RC(shardc_guard_restore(id));
    CHECK(pristine(p, size) && pristine(s, size));
    CHECK_RC(shardc_guard_set_limits(256, 8192));
    CHECK_RC(shardc_guard_remove(id));
    shardc_seg_unmap(p, size);
    shardc_seg_unmap(s, size);
    close(fd);
}

/* install() gives a process without an alternate signal stack one. */
static void test_altstack(void)
{
    pid_t pid = fork();
    int status;

    CHECK(pid >= 0);
    if (pid == 0) {
        stack_t ss;
        memset(&ss, 0, sizeof(ss));
        ss.ss_flags = SS_DISABLE;
        if (sigaltstack(&ss, NULL) != 0 || shardc_guard_uninstall() < 0)
            _exit(2);
        if (shardc_guard_install(NULL, SIGUSR2, 0) < 0 || sigaltstack(NULL, &ss) != 0)
            _exit(3);
        _exit((ss.ss_flags & SS_DISABLE) || ss.ss_size < 16384 ? 4 : 0);
    }
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

struct writer {
    unsigned char *p;
    uint64_t npages;
};

static void *write_all_pages(void *arg)
{
    struct writer *w = arg;
    uint64_t i, ps = shardc_page_size();
    for (i = 0; i < w->npages; i++)
        poke(w->p, i * ps + 1, 0x5A);
    return NULL;
}

/* Threads racing to fault the same pages: every page is counted once and
 * restored; nothing reaches the segment. */
static void test_threads_race_on_pages(void)
{
    uint64_t ps = shardc_page_size(), npages = 200, size = npages * ps;
    unsigned char *p, *s;
    int fd = make_input(size, &p, &s), id, i;
    pthread_t th[4];
    struct writer w = {0, npages};
    shardc_guard_info_t info;
    shardc_guard_counters_t c;

    w.p = p;
    CHECK_RC(shardc_guard_install(count_notify, SIGUSR2, 0));
    CHECK_RC(shardc_guard_add(p, size, SHARDC_GUARD_AUDIT, &id));
    for (i = 0; i < 4; i++)
        CHECK(pthread_create(&th[i], NULL, write_all_pages, &w) == 0);
    for (i = 0; i < 4; i++)
        CHECK(pthread_join(th[i], NULL) == 0);
    CHECK_RC(shardc_guard_collect(id, &info));
    CHECK(info.pages == npages && info.faults >= npages);
    CHECK(pristine(s, size));
    CHECK_RC(shardc_guard_restore(id));
    CHECK(pristine(p, size));
    CHECK_RC(shardc_guard_counters(&c));
    CHECK(c.tracked == 0);
    CHECK_RC(shardc_guard_remove(id));
    shardc_seg_unmap(p, size);
    shardc_seg_unmap(s, size);
    close(fd);
}

int main(void)
{
    if (!shardc_seg_backing_supported(SHARDC_BACKING_MEMFD)) {
        printf("ok 1 - skipped (no memfd)\n");
        return 0;
    }
    RUN(test_region_table);
    RUN(test_fault_records_and_restores);
    RUN(test_modes_and_raise_notify);
    RUN(test_chaining);
    RUN(test_many_scattered_pages);
    RUN(test_altstack);
    RUN(test_threads_race_on_pages);
    CHECK_RC(shardc_guard_uninstall());
    return 0;
}
