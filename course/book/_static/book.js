// A book opened from disk (file://) cannot fetch() its own pages, which the search page does
// to show a summary under each result: there, list the results without summaries instead
// of failing.  Served over HTTP the summaries stay.
if (window.location.protocol === "file:" && typeof DOCUMENTATION_OPTIONS !== "undefined") {
  DOCUMENTATION_OPTIONS.SHOW_SEARCH_SUMMARY = false;
}
