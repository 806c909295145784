"""Plumbing every layer shares: terminal and markdown tables, process set-up (threads, quiet libraries, file locks)."""
