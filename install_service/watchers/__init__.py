"""Watchers at run time: their cron schedules, when each runs next, and the desired state a
runner reconciles against."""
