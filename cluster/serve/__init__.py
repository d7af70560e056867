"""``chimera serve``: the chat page (Wyrd) and its HTTP API, on the standard library."""
