"""What a user looks at: the stats API, the report, inspect, the token view."""
