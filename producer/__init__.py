"""Producers: turn URIs, bucket listings and storage events into CaptionJobs on the broker."""
