"""The page allocator: which pages of the KV-cache pool each request owns.

The pool is ``num_pages`` pages of ``page_size`` tokens (one pool of that shape per layer for K
and one for V; a page number means the same slot in all of them). A request's keys at position
p live in page ``pages[p // page_size]``, slot ``p % page_size``: the list of its pages, in
position order, is its row of the block table.

Admission reserves a request's worst-case page count (its prompt and every token it will feed
back); pages themselves are handed out only as the request's cache grows into them, and all
return to the pool when it finishes. The reservation means that a running request never waits
for a page, so nothing ever has to be preempted or recomputed (vLLM preempts instead and admits
more optimistically; a demo with known output lengths does not need to).
"""

from __future__ import annotations

from collections.abc import Hashable


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PageAllocator:
    """Pages 0 .. num_pages - 1, each free or owned by one request (any hashable id)."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(
                f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}"
            )
        self.num_pages = num_pages
        self.page_size = page_size
        # A stack, popped from the end: page 0 goes out first, a freed page is reused first.
        self._free = list(range(num_pages - 1, -1, -1))
        self._pages: dict[Hashable, list[int]] = {}  # owner -> its pages, in position order
        self._reserved: dict[Hashable, int] = {}  # owner -> pages it may grow to
        self._reserved_total = 0

    def pages_for(self, tokens: int) -> int:
        """Pages that hold ``tokens`` tokens."""
        return ceil_div(tokens, self.page_size)

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def unreserved(self) -> int:
        """Pages no running request may still claim: what admission can promise."""
        return self.num_pages - self._reserved_total

    def reserve(self, owner: Hashable, pages: int) -> bool:
        """Promises ``owner`` up to ``pages`` pages if the pool can still keep that promise
        together with every earlier one; False (nothing changes) if it cannot yet."""
        if owner in self._reserved:
            raise ValueError(f"{owner!r} already holds a reservation")
        if pages > self.unreserved:
            return False
        self._reserved[owner] = pages
        self._reserved_total += pages
        self._pages[owner] = []
        return True

    def grow(self, owner: Hashable, tokens: int) -> None:
        """Gives ``owner`` the pages its first ``tokens`` tokens need (none if it has them)."""
        pages = self._pages[owner]
        needed = self.pages_for(tokens)
        if needed > self._reserved[owner]:
            raise RuntimeError(
                f"{owner!r} needs {needed} pages for {tokens} tokens but reserved "
                f"{self._reserved[owner]}: its reservation was too small"
            )
        while len(pages) < needed:
            # Never empty here: the reservations add up to at most num_pages.
            pages.append(self._free.pop())

    def release(self, owner: Hashable) -> None:
        """Returns ``owner``'s pages to the pool and drops its reservation."""
        self._free.extend(reversed(self._pages.pop(owner)))
        self._reserved_total -= self._reserved.pop(owner)

    def pages_of(self, owner: Hashable) -> tuple[int, ...]:
        """``owner``'s pages in position order (its block-table row)."""
        return tuple(self._pages[owner])

    def owners(self) -> tuple[Hashable, ...]:
        """Every owner holding a reservation."""
        return tuple(self._pages)

    def free_pages(self) -> tuple[int, ...]:
        return tuple(self._free)
