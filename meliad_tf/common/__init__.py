"""The bottom floor: what every other floor uses (files on any filesystem)."""
