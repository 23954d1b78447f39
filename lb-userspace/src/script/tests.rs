use super::*;

const LIMITS: Limits = Limits {
    instructions: 100_000,
    memory_bytes: 4 << 20,
};

fn pool(src: &str) -> ScriptPool {
    check("t.lua", src, LIMITS).unwrap_or_else(|e| panic!("the script compiles: {e}"));
    ScriptPool::new("t.lua", src, LIMITS, 2)
}

fn req<'a>(headers: &'a [(&'a str, &'a [u8])]) -> Request<'a> {
    Request {
        method: "GET",
        path: "/a/b",
        query: vec![("sid", "q1"), ("sid", "q2"), ("x", "")],
        headers: headers.to_vec(),
        cookies: vec![("JSESSIONID", "c1")],
        client: Some("192.0.2.7:40000".parse().unwrap()),
    }
}

#[test]
fn a_script_sees_the_request_and_answers_a_key_a_backend_or_nothing() {
    let p = pool(
        r#"
        function persist(req)
          if req.headers["x-user"] then return "u:" .. req.headers["x-user"] end
          if req.path == "/a/b" and req.query.sid == "q1" and req.cookies.JSESSIONID == "c1"
             and req.method == "GET" and req.client_ip == "192.0.2.7" and req.client_port == 40000
             and req.headers["x-b"] then
            return { backend = req.headers["x-b"] }
          end
          if req.headers["x-n"] then return 42 end
          if req.headers["x-multi"] then return req.headers["x-multi"] end
          return nil
        end
        "#,
    );
    assert_eq!(
        p.call(&req(&[("x-user", b"ann")])),
        Ok(Answer::Key(b"u:ann".to_vec()))
    );
    assert_eq!(
        p.call(&req(&[("x-b", b"b2")])),
        Ok(Answer::Backend("b2".into()))
    );
    assert_eq!(
        p.call(&req(&[("x-n", b"1")])),
        Ok(Answer::Key(b"42".to_vec()))
    );
    assert_eq!(
        p.call(&req(&[("x-multi", b"a"), ("x-multi", b"b")])),
        Ok(Answer::Key(b"a, b".to_vec())),
        "repeated fields are joined"
    );
    assert_eq!(p.call(&req(&[])), Ok(Answer::Nothing));
}

#[test]
fn a_script_that_does_not_compile_is_refused_with_its_line() {
    let e = check(
        "/etc/tether/p.lua",
        "function persist(req)\n  local x = \n  return x +\nend\n",
        LIMITS,
    )
    .unwrap_err();
    assert_eq!(
        e.message, "/etc/tether/p.lua:3: unexpected symbol near 'return'",
        "file, line and reason"
    );
    let e = check("p.lua", "x = 1\n", LIMITS).unwrap_err();
    assert!(e.message.contains("function persist(req)"), "{}", e.message);
    let e = check("p.lua", "while true do end\nfunction persist() end", LIMITS).unwrap_err();
    assert!(e.message.contains("instruction budget"), "{}", e.message);
}

#[test]
fn the_sandbox_has_no_io_os_load_or_pcall() {
    for (expr, what) in [
        ("io.open('/etc/passwd')", "io"),
        ("os.execute('true')", "os"),
        ("require('x')", "require"),
        ("load('return 1')()", "load"),
        ("dofile('/etc/passwd')", "dofile"),
        ("loadfile('/etc/passwd')", "loadfile"),
        ("pcall(error)", "pcall"),
        ("string.dump(persist)", "string.dump"),
        ("debug.getinfo(1)", "debug"),
        ("collectgarbage('stop')", "collectgarbage"),
    ] {
        let p = pool(&format!("function persist(req) return {expr} end"));
        match p.call(&req(&[])) {
            Err(CallError::Failed(m)) => assert!(m.contains("nil"), "{what}: {m}"),
            other => panic!("{what} must not be callable: {other:?}"),
        }
    }
    // What a script may use.
    let p = pool(
        "function persist(req) return string.upper(string.sub('abcdef', 2, 3)) .. math.floor(2.5) .. table.concat({'x','y'}) .. utf8.char(65) end",
    );
    assert_eq!(p.call(&req(&[])), Ok(Answer::Key(b"BC2xyA".to_vec())));
}

#[test]
fn a_runaway_call_is_cut_off_and_the_next_call_runs() {
    let p = pool(
        r#"
        n = 0
        function persist(req)
          n = n + 1
          if req.headers["loop"] then while true do end end
          if req.headers["eat"] then local t = {} for i = 1, 1e9 do t[i] = string.rep("x", 1000) .. i end end
          return "calls:" .. n
        end
        "#,
    );
    assert_eq!(p.call(&req(&[])), Ok(Answer::Key(b"calls:1".to_vec())));
    assert_eq!(p.call(&req(&[("loop", b"1")])), Err(CallError::Budget));
    let big = ScriptPool::new(
        "t.lua",
        "function persist(req) local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1000) .. i end end",
        Limits {
            instructions: u64::MAX,
            memory_bytes: 1 << 20,
        },
        1,
    );
    assert_eq!(big.call(&req(&[])), Err(CallError::Memory));
    // The pool still answers; the state that was cut off was rebuilt (its globals reset).
    let answers: Vec<_> = (0..4).map(|_| p.call(&req(&[]))).collect();
    assert!(
        answers.iter().all(|a| matches!(a, Ok(Answer::Key(_)))),
        "{answers:?}"
    );
    assert!(
        answers.contains(&Ok(Answer::Key(b"calls:1".to_vec()))),
        "a rebuilt state starts over: {answers:?}"
    );
}

#[test]
fn a_runtime_error_or_a_bad_answer_is_an_error() {
    let p = pool("function persist(req) return req.nope.x end");
    assert!(matches!(p.call(&req(&[])), Err(CallError::Failed(m)) if m.contains("t.lua:1")));
    let p = pool("function persist(req) return {} end");
    assert!(matches!(p.call(&req(&[])), Err(CallError::Failed(_))));
    let p = pool("function persist(req) return true end");
    assert!(matches!(p.call(&req(&[])), Err(CallError::Failed(m)) if m.contains("boolean")));
}

#[test]
fn calls_from_many_threads_share_the_pool() {
    let p = std::sync::Arc::new(pool("function persist(req) return req.headers['k'] end"));
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let p = p.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let v = format!("{t}-{i}");
                    let h = [("k", v.as_bytes())];
                    assert_eq!(p.call(&req(&h)), Ok(Answer::Key(v.clone().into_bytes())));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("no thread panicked");
    }
}
