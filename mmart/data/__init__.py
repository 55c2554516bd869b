"""The data contract (what every stage reads) and the demo world that fills it."""
