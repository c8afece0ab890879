"""The NBD store plugin."""
