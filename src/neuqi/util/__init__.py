"""Small shared helpers: user errors, crash-safe files, fault injection for tests, devices, the
allocator, progress display.
"""
