"""What people read: progress, display, words, logs, status, report, thumbs, export, history."""
