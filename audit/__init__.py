"""Who did what, when, from where: the audit log that staff read in the ops console."""
