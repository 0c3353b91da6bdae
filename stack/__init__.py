"""Host-side logic of the stack scripts (standard library only)."""
