"""The shipped calibration text and the code that turns text into calibration windows.
"""
