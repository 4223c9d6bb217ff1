"""NA backends. Each states what it supports (`unsupported(problem)`); `kernels/dispatch.py` picks one."""
