use rstest::rstest;

use super::*;

#[rstest]
#[case::bare_name("requests")]
#[case::dotted_name("zope.interface")]
#[case::underscore_name("typing_extensions")]
#[case::pinned("requests==2.31.0")]
#[case::lower_bound("pandas>=2.0.0")]
#[case::range("pandas>=2.0,<3")]
#[case::compatible("numpy~=1.26.0")]
#[case::not_equal("urllib3!=2.0.0")]
#[case::arbitrary_equality("foo===1.0-custom")]
#[case::wildcard("django==4.2.*")]
#[case::wildcard_major("django==1.*")]
#[case::local_version("torch==2.1.0+cpu")]
#[case::prerelease("black==24.1.0b1")]
#[case::post_and_dev("thing==1.0.post1.dev3")]
#[case::epoch("thing==1!2.0")]
#[case::parenthesised("requests(>=2.0,<3)")]
#[case::extras("requests[socks]==2.31.0")]
#[case::two_extras("uvicorn[standard,http2]>=0.20")]
#[case::marker("requests; python_version >= \"3.8\"")]
#[case::marker_space_before("requests==2.31.0 ; python_version < '3.13'")]
#[case::marker_and_or(
    "pywin32>=300; sys_platform == 'win32' and (platform_machine == 'AMD64' or platform_machine == 'x86')"
)]
#[case::marker_in("foo; 'linux' in sys_platform")]
#[case::marker_not_in("foo; platform_machine not in 'arm64 aarch64'")]
#[case::marker_extra("foo; extra == 'test'")]
#[case::git_https("git+https://github.com/org/repo.git@v1.2.0")]
#[case::git_https_egg("git+https://github.com/org/repo.git@main#egg=repo")]
#[case::git_ssh("git+ssh://git@github.com/org/private.git@abc123")]
#[case::hg("hg+https://hg.example.com/repo@tip")]
#[case::svn("svn+https://svn.example.com/repo/trunk")]
#[case::bzr("bzr+https://bzr.example.com/repo")]
#[case::https_wheel("https://files.example.com/pkg-1.0-py3-none-any.whl")]
#[case::ssh("ssh://git@example.com/org/repo.git")]
#[case::scp_like("git@github.com:org/repo.git")]
#[case::name_at_url("mylib @ git+https://github.com/org/mylib.git@v1.0")]
#[case::name_at_url_no_space("mylib@https://example.com/mylib-1.0.tar.gz")]
#[case::name_extras_at_url("mylib[fast] @ https://example.com/mylib-1.0.tar.gz")]
#[case::name_at_url_marker("mylib @ https://example.com/mylib.whl ; python_version >= '3.9'")]
#[case::subdirectory("mylib @ git+https://github.com/org/mono.git#subdirectory=libs/mylib")]
#[case::env_var_in_url("mylib @ https://${PIP_TOKEN}@pkgs.example.com/mylib-1.0.whl")]
#[case::url_with_port("mylib @ https://pkgs.example.com:8443/mylib-1.0.whl")]
#[case::url_with_query("https://pkgs.example.com/mylib-1.0-py3-none-any.whl?raw=1")]
fn accepts(#[case] input: &str) {
    if let Err(e) = parse(input) {
        panic!("{input:?} rejected: {e}");
    }
}

#[rstest]
#[case::shell_after_marker_separator("requests; rm -rf /", "marker")]
#[case::pip_option("--index-url=https://evil.example.com", "pip options")]
#[case::pip_short_option("-r requirements.txt", "pip options")]
#[case::editable("-e git+https://github.com/org/repo.git", "pip options")]
#[case::relative_path("./mypkg", "local paths")]
#[case::absolute_path("/tmp/mypkg.whl", "local paths")]
#[case::home_path("~/mypkg", "local paths")]
#[case::nested_path("libs/mypkg", "local paths")]
#[case::file_url("file:///tmp/mypkg.whl", "file:")]
#[case::named_file_url("mypkg @ file:///tmp/mypkg.whl", "file:")]
#[case::http_scheme("http://example.com/x.whl", "scheme")]
#[case::ftp_scheme("mypkg @ ftp://example.com/x.whl", "scheme")]
#[case::git_plain_http("git+http://example.com/repo.git", "scheme")]
#[case::space_in_specifier("requests >= 2.0", "whitespace")]
#[case::option_after_space("requests --index-url https://evil", "whitespace")]
#[case::newline("requests\n--index-url=https://evil", "control")]
#[case::tab("requests\t==2.0", "control")]
#[case::nul("requests\0", "control")]
#[case::backtick_url("https://example.com/`id`.whl", "metacharacter")]
#[case::command_substitution("https://example.com/$(id).whl", "metacharacter")]
#[case::pipe_url("git+https://example.com/r.git|sh", "metacharacter")]
#[case::ampersand_url("git+https://example.com/r.git#egg=r&subdirectory=x", "metacharacter")]
#[case::redirect_url("https://example.com/x.whl>out", "metacharacter")]
#[case::semicolon_in_url("https://example.com/x.whl;id", "';'")]
#[case::space_in_url("mypkg @ https://example.com/x y.whl", "whitespace")]
#[case::url_without_host("https:///x.whl", "no host")]
#[case::bad_name("-requests", "pip options")]
#[case::bad_name_chars("req!uests", "version specifier")]
#[case::name_ends_with_dot("requests.", "not a valid distribution name")]
#[case::bad_version("requests==not a version", "whitespace")]
#[case::bad_version_word("requests==latest", "not a valid version")]
#[case::wildcard_with_lower_bound("requests>=2.*", "not a valid version")]
#[case::local_with_lower_bound("torch>=2.1+cpu", "not a valid version")]
#[case::compatible_single_part("numpy~=1", "two parts")]
#[case::bad_operator("requests=>2", "not a version specifier")]
#[case::unbalanced_extras("requests[socks==2", "unbalanced")]
#[case::bad_marker_variable("requests; os.system('id')", "marker")]
#[case::marker_unterminated("requests; python_version >= '3.8", "unterminated")]
#[case::marker_trailing("requests; python_version >= '3.8' rm", "marker")]
#[case::empty_marker("requests;", "empty marker")]
#[case::non_ascii("reqüests", "non-ASCII")]
#[case::empty("", "empty")]
#[case::space_dash_in_marker("foo; python_version == ' -x'", "an option")]
#[case::space_hash_in_marker("foo; sys_platform == 'a #b'", "a comment")]
#[case::line_continuation("foo===1\\", "joins the next line")]
#[case::archive_name("other.tar.gz", "local file")]
#[case::wheel_name("pkg-1.0-py3-none-any.whl", "local file")]
#[case::archive_name_with_marker("other.tar.gz; os_name == 'nt'", "local file")]
#[case::not_a_wheel_file_name("https://pkgs.example.com/mylib-1.0.whl", "wheel file name")]
#[case::subdirectory_up(
    "mylib @ git+https://github.com/org/mono.git#subdirectory=../..",
    "without '..'"
)]
#[case::subdirectory_absolute(
    "git+https://github.com/org/mono.git#subdirectory=/etc",
    "without '..'"
)]
fn rejects(#[case] input: &str, #[case] reason: &str) {
    match parse(input) {
        Ok(r) => panic!("{input:?} accepted as {r:?}"),
        Err(e) => assert!(
            e.contains(reason),
            "{input:?}: {e:?} should mention {reason:?}"
        ),
    }
}

#[test]
fn rejects_over_long() {
    let long = format!("a{}", "b".repeat(MAX_LEN));
    assert!(parse(&long).unwrap_err().contains("longer than 1000"));
    let just_fits = format!("a{}", "b".repeat(MAX_LEN - 1));
    assert!(parse(&just_fits).is_ok());
}

#[rstest]
#[case("requests", true)]
#[case("pandas>=2.0.0", true)]
#[case("pandas>2,!=2.1", true)]
#[case("pandas>=2.0,<3", false)]
#[case("pandas==2.0.3", false)]
#[case("mylib @ git+https://example.com/mylib.git@v1", false)]
fn unpinned(#[case] input: &str, #[case] expected: bool) {
    assert_eq!(parse(input).expect("valid").is_unpinned(), expected);
}
