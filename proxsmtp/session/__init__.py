"""One client session: its life cycle, the relay pump, commands, replies, STARTTLS."""
