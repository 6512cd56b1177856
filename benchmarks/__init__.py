"""Side-by-side measurements of this code base against diffusers (scripts, not tests; see README.md)."""
