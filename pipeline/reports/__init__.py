"""Reports: ``report.json`` + ``report.html`` of a job, ``predictions.csv``, and the
leaderboard of a comparison. HTML comes from Jinja2 templates with inline SVG plots."""
