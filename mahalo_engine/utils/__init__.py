"""Support code: checkpoint loading and saving."""
