// The periodic task form of django-celery-beat: show the chosen crontab in words under its
// field. Moved out of the library's template (an inline script) so the ops console runs under
// a content security policy that allows scripts from files only.
(function () {
  "use strict";
  var $ = django.jQuery;
  var data = document.getElementById("readable-crontabs");
  if (!data) {
    return;
  }
  var readable = JSON.parse(data.textContent);
  var help = $(".field-crontab .help");
  var original = help.html();
  $(".field-crontab_translation").hide();
  $(".field-crontab").change(function () {
    var words = readable[$("#id_crontab").val()];
    help.html(original).append("<br>").append(document.createTextNode("Translation: " + words));
  });
})();
