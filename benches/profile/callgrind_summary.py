"""Per-request figures of a callgrind dump of a bench-gateway server.

Requests are counted as calls of hyper's server-side head parser (one per request), or, when
that call was inlined (a build with LTO), of its client-side one (one per upstream answer: the
same count when nothing is retried or served from the cache); heap allocations as calls of
Rust's allocator entry points (alloc, alloc_zeroed, realloc), or, when LTO inlined those into
their callers, of mimalloc's (`mi_malloc_aligned`, `mi_zalloc_aligned`, `mi_realloc_aligned`,
which the `mimalloc` crate calls for every allocation).
Prints the totals per request and where the allocations come from (direct callers).
"""

import collections
import re
import sys

ALLOC = {"__rustc::__rust_alloc", "__rustc::__rust_alloc_zeroed", "__rustc::__rust_realloc"}
MI_ALLOC = {"mi_malloc_aligned", "mi_zalloc_aligned", "mi_realloc_aligned"}
REQUEST = "<hyper::proto::h1::role::Server as hyper::proto::h1::Http1Transaction>::parse"
UPSTREAM_ANSWER = "<hyper::proto::h1::role::Client as hyper::proto::h1::Http1Transaction>::parse"


def main(path: str) -> None:
    names: dict[str, str] = {}
    calls: collections.Counter[str] = collections.Counter()
    alloc_callers: collections.Counter[str] = collections.Counter()
    mi_callers: collections.Counter[str] = collections.Counter()
    current = callee = None
    total = 0

    def name(spec: str) -> str:
        m = re.match(r"\((\d+)\)(?: (.*))?", spec)
        if not m:
            return spec
        ident, text = m.groups()
        if text:
            names[ident] = text
        return names.get(ident, "?")

    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("fn="):
                current = name(line[3:].strip())
            elif line.startswith("cfn="):
                callee = name(line[4:].strip())
            elif line.startswith("calls="):
                n = int(line[6:].split()[0])
                calls[callee] += n
                if callee in ALLOC:
                    alloc_callers[current] += n
                elif callee in MI_ALLOC and current not in ALLOC:
                    mi_callers[current] += n
            elif line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
    requests = calls[REQUEST] or calls[UPSTREAM_ANSWER]
    if requests == 0:
        sys.exit("no request in the profile")
    if calls[REQUEST] == 0:
        print("(requests counted as upstream answers: the server's head parser was inlined)")
    if not alloc_callers:
        alloc_callers = mi_callers
    allocs = sum(alloc_callers.values())
    print(f"requests: {requests}")
    print(f"instructions per request: {total / requests:,.0f}")
    print(f"heap allocations per request: {allocs / requests:.1f}")
    print("largest allocating callers (per request):")
    for caller, n in alloc_callers.most_common(12):
        print(f"  {n / requests:6.2f}  {caller[:140]}")


if __name__ == "__main__":
    main(sys.argv[1])
