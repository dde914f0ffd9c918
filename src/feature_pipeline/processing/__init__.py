"""Per-type processing steps (parse, clean, chunk, embed), found through the handler registry."""
