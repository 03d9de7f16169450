"""The broker: capture engines (engine/, in C), sources, the bookkeeping and the loop."""
